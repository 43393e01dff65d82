//! The write SQL: one function per operation the writer applies (begin an
//! attempt, record a stage, finish an attempt, record a job that did not
//! run), each inside the writer's batch transaction and fenced by the
//! delivery's lease.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::{BeginJob, FinishJob, Prior, RecordJob, StageUpdate};
use crate::job::Status;

pub(super) fn begin(tx: &Connection, job: &BeginJob) -> rusqlite::Result<Prior> {
    let prior: Option<(String, u32, u32)> = if job.first {
        None
    } else {
        tx.prepare_cached("SELECT status, attempt, epoch FROM jobs WHERE id = ?1")?
            .query_row([&job.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
    };
    let mut out = Prior::default();
    let mut new_epoch = false;
    if let Some((status, attempt, epoch)) = prior {
        out.status = Status::parse(&status);
        out.attempt = attempt;
        out.epoch = epoch;
        if out.finished_for(job.epoch) {
            return Ok(out);
        }
        new_epoch = epoch < job.epoch;
    }
    tx.prepare_cached(
        "INSERT INTO jobs (id, type, queue, status, attempt, max_attempts, payload, worker_id,
                           lease, epoch, created_at, updated_at, started_at)
         VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?10)
         ON CONFLICT (id) DO UPDATE SET
            status = 'running', attempt = excluded.attempt, queue = excluded.queue,
            max_attempts = excluded.max_attempts, worker_id = excluded.worker_id,
            lease = excluded.lease, epoch = excluded.epoch,
            error = NULL, finished_at = NULL, updated_at = excluded.updated_at,
            started_at = coalesce(jobs.started_at, excluded.started_at)",
    )?
    .execute(params![
        job.id,
        job.kind,
        job.queue,
        job.attempt,
        job.max_attempts,
        job.payload,
        job.worker_id,
        job.lease,
        job.epoch,
        job.at
    ])?;
    tx.prepare_cached(
        "INSERT INTO attempts (job_id, epoch, attempt, worker_id, status, started_at)
         VALUES (?1, ?2, ?3, ?4, 'running', ?5)
         ON CONFLICT (job_id, epoch, attempt) DO UPDATE SET
            status = 'running', worker_id = excluded.worker_id, finished_at = NULL",
    )?
    .execute(params![
        job.id,
        job.epoch,
        job.attempt,
        job.worker_id,
        job.at
    ])?;
    let mut add_stage = tx.prepare_cached(
        "INSERT OR IGNORE INTO stages (job_id, idx, name, status) VALUES (?1, ?2, ?3, 'pending')",
    )?;
    for (i, name) in job.stages.iter().enumerate() {
        add_stage.execute(params![job.id, i as i64, name])?;
    }
    if new_epoch {
        let mut reset = tx.prepare_cached(
            "UPDATE stages SET name = ?3, status = 'pending', attempt = 0, started_at = NULL,
                finished_at = NULL, result = NULL, error = NULL, worker_id = NULL, pool = NULL
             WHERE job_id = ?1 AND idx = ?2",
        )?;
        for (i, name) in job.stages.iter().enumerate() {
            if !job.carried.contains(name) {
                reset.execute(params![job.id, i as i64, name])?;
            }
        }
        // What the new story resumes from travels in the job itself.
        return Ok(out);
    }
    if job.first {
        return Ok(out);
    }
    let mut done = tx.prepare_cached(
        "SELECT name, result FROM stages WHERE job_id = ?1 AND status = 'completed' ORDER BY idx",
    )?;
    let rows = done.query_map([&job.id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
    })?;
    for row in rows {
        let (name, result) = row?;
        let value = result
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or(Value::Null);
        out.results.insert(name, value);
    }
    Ok(out)
}

pub(super) fn stage(tx: &Connection, u: &StageUpdate) -> rusqlite::Result<bool> {
    // Fenced: only the delivery holding the job's lease writes its state.
    let changed = tx
        .prepare_cached(
            "UPDATE jobs SET progress = max(progress, ?3), stage = ?4, updated_at = ?5
             WHERE id = ?1 AND lease = ?2",
        )?
        .execute(params![u.job_id, u.lease, u.progress, u.name, u.at])?;
    if changed == 0 {
        return Ok(false);
    }
    let finished = (u.status != "running").then_some(&u.at);
    tx.prepare_cached(
        "INSERT INTO stages (job_id, idx, name, status, attempt, started_at, finished_at, result,
            error, worker_id, pool)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (job_id, idx) DO UPDATE SET
            name = excluded.name, status = excluded.status, attempt = excluded.attempt,
            started_at = excluded.started_at, finished_at = excluded.finished_at,
            result = excluded.result, error = excluded.error,
            worker_id = excluded.worker_id, pool = excluded.pool",
    )?
    .execute(params![
        u.job_id,
        u.index as i64,
        u.name,
        u.status,
        u.attempt,
        u.started_at,
        finished,
        u.result,
        u.error,
        u.worker_id,
        u.pool
    ])?;
    Ok(true)
}

pub(super) fn finish(tx: &Connection, f: &FinishJob) -> rusqlite::Result<bool> {
    // A handed-over job is done on this host: it gets its end time, so
    // `conveyor cleanup` deletes it in time, and its row names the stage it
    // went on with (a finished job's row names none).
    let finished_at = f.status.is_done_here().then_some(&f.at);
    let next_stage = f.handed_to.as_ref().map(|h| &h.stage);
    // Fenced by the lease, which ends with the delivery: nothing more may be
    // written under it.
    let changed = tx
        .prepare_cached(
            "UPDATE jobs SET status = ?3, progress = ?4, error = ?5, updated_at = ?6,
                finished_at = ?7, stage = CASE WHEN ?8 IS NOT NULL THEN ?8
                                               WHEN ?7 IS NULL THEN stage END,
                lease = NULL
             WHERE id = ?1 AND lease = ?2",
        )?
        .execute(params![
            f.id,
            f.lease,
            f.status.as_str(),
            f.progress,
            f.error,
            f.at,
            finished_at,
            next_stage
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    if let Some(h) = &f.handed_to {
        tx.prepare_cached(
            "UPDATE stages SET pool = ?3 WHERE job_id = ?1 AND idx = ?2 AND status = 'pending'",
        )?
        .execute(params![f.id, h.index as i64, h.pool])?;
    }
    let attempt_status = match f.status {
        Status::Pending => "interrupted",
        Status::Retrying => "failed",
        other => other.as_str(),
    };
    tx.prepare_cached(
        "UPDATE attempts SET status = ?4, finished_at = ?5, error = ?6
         WHERE job_id = ?1 AND epoch = ?2 AND attempt = ?3",
    )?
    .execute(params![
        f.id,
        f.epoch,
        f.attempt,
        attempt_status,
        f.at,
        f.error
    ])?;
    Ok(true)
}

pub(super) fn record(tx: &Connection, r: &RecordJob) -> rusqlite::Result<()> {
    // A bad message that reuses the id of a known job must not rewrite that
    // job's history (the dead entry and the log carry its reason); a
    // cancellation overwrites anything but a final state.
    let sql = if r.overwrite {
        "INSERT INTO jobs (id, type, queue, status, payload, error, worker_id,
                           created_at, updated_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8)
         ON CONFLICT (id) DO UPDATE SET
            status = excluded.status, error = excluded.error, worker_id = excluded.worker_id,
            updated_at = excluded.updated_at, finished_at = excluded.finished_at, lease = NULL
         WHERE jobs.status NOT IN ('completed', 'failed', 'cancelled')"
    } else {
        "INSERT INTO jobs (id, type, queue, status, payload, error, worker_id,
                           created_at, updated_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8)
         ON CONFLICT (id) DO NOTHING"
    };
    tx.prepare_cached(sql)?.execute(params![
        r.id,
        r.kind,
        r.queue,
        r.status.as_str(),
        r.payload,
        r.error,
        r.worker_id,
        r.at
    ])?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::HandedTo;
    use crate::store::{Reader, Store, schema};

    pub(crate) fn begin_job(id: &str, lease: &str) -> BeginJob {
        BeginJob {
            id: id.into(),
            kind: "t".into(),
            queue: "default".into(),
            payload: "{\"a\":1}".into(),
            attempt: 1,
            max_attempts: 3,
            epoch: 0,
            lease: lease.into(),
            carried: Vec::new(),
            first: false,
            worker_id: "w1".into(),
            stages: vec!["s0".into(), "s1".into()].into(),
            at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    fn stage_done(id: &str, lease: &str, index: usize, name: &str) -> StageUpdate {
        StageUpdate {
            job_id: id.into(),
            lease: lease.into(),
            index,
            name: name.into(),
            attempt: 1,
            status: "completed",
            result: Some("{\"ok\":true}".into()),
            error: None,
            progress: 50.0,
            worker_id: format!("w-{lease}"),
            pool: "gpu".into(),
            started_at: "2026-01-01T00:00:00.500Z".into(),
            at: "2026-01-01T00:00:01.000Z".into(),
        }
    }

    fn finish(id: &str, lease: &str, status: Status) -> FinishJob {
        FinishJob {
            id: id.into(),
            lease: lease.into(),
            status,
            attempt: 1,
            epoch: 0,
            progress: 100.0,
            error: None,
            at: "2026-01-01T00:00:02.000Z".into(),
            handed_to: None,
        }
    }

    #[tokio::test]
    async fn lifecycle_round_trip_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let (store, closer) = Store::open(&path).unwrap();
        let prior = store.begin(begin_job("j1", "a")).await.unwrap();
        assert_eq!(prior.status, None);
        store.stage(stage_done("j1", "a", 0, "s0")).await.unwrap();
        store.flush().await.unwrap();

        // A redelivery sees the finished stage and its result.
        let prior = store.begin(begin_job("j1", "b")).await.unwrap();
        assert_eq!(prior.status, Some(Status::Running));
        assert_eq!(prior.results["s0"], serde_json::json!({"ok": true}));

        assert!(
            store
                .finish(finish("j1", "b", Status::Completed))
                .await
                .unwrap()
        );
        // A completed job is left alone by a duplicate delivery of its epoch.
        let prior = store.begin(begin_job("j1", "c")).await.unwrap();
        assert_eq!(prior.status, Some(Status::Completed));
        assert!(prior.finished_for(0));

        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "completed");
        assert_eq!(job.progress, 100.0);
        assert_eq!(job.payload, serde_json::json!({"a": 1}));
        assert_eq!(job.stages.len(), 2);
        assert_eq!(job.stages[0].status, "completed");
        assert_eq!(job.stages[1].status, "pending");
        // Schema 4: who ran a stage, in which pool; nothing for one not run.
        assert_eq!(job.stages[0].worker_id.as_deref(), Some("w-a"));
        assert_eq!(job.stages[0].pool.as_deref(), Some("gpu"));
        assert_eq!(job.stages[1].worker_id, None);
        assert_eq!(job.stages[1].pool, None);
        assert_eq!(job.attempts.len(), 1);
        assert_eq!(job.attempts[0].status, "completed");
        assert_eq!(
            reader.counts_by_status().unwrap(),
            vec![("completed".into(), 1)]
        );
        assert_eq!(reader.schema_version().unwrap(), schema::VERSION);
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn a_stale_lease_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "old")).await.unwrap();
        // The job is recovered and delivered again under a new lease.
        store.begin(begin_job("j1", "new")).await.unwrap();
        store.stage(stage_done("j1", "old", 0, "s0")).await.unwrap();
        assert!(
            !store
                .finish(finish("j1", "old", Status::Completed))
                .await
                .unwrap()
        );
        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "running");
        assert_eq!(job.stages[0].status, "pending");
        assert!(
            store
                .finish(finish("j1", "new", Status::Completed))
                .await
                .unwrap()
        );
        // The lease ends with the delivery.
        assert!(
            !store
                .finish(finish("j1", "new", Status::Failed))
                .await
                .unwrap()
        );
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn a_revived_job_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "a")).await.unwrap();
        assert!(
            store
                .finish(finish("j1", "a", Status::Failed))
                .await
                .unwrap()
        );
        let mut revived = begin_job("j1", "b");
        revived.epoch = 1;
        let prior = store.begin(revived).await.unwrap();
        assert_eq!(prior.status, Some(Status::Failed));
        assert!(!prior.finished_for(1));
        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "running");
        assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn a_new_epoch_starts_over_except_the_carried_stages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "a")).await.unwrap();
        store.stage(stage_done("j1", "a", 0, "s0")).await.unwrap();
        store.stage(stage_done("j1", "a", 1, "s1")).await.unwrap();
        assert!(
            store
                .finish(finish("j1", "a", Status::Completed))
                .await
                .unwrap()
        );
        // The same epoch again is a duplicate of a finished job.
        let prior = store.begin(begin_job("j1", "x")).await.unwrap();
        assert!(prior.finished_for(0));
        // A later story resumes from nothing SQLite holds.
        let mut again = begin_job("j1", "b");
        again.epoch = 1_763_900_000;
        let prior = store.begin(again).await.unwrap();
        assert!(!prior.finished_for(1_763_900_000));
        assert!(prior.results.is_empty(), "{:?}", prior.results);
        let job = Reader::open(&path).unwrap().job("j1").unwrap().unwrap();
        let statuses: Vec<_> = job.stages.iter().map(|s| s.status.as_str()).collect();
        assert_eq!(statuses, ["pending", "pending"]);
        assert_eq!(job.attempts.len(), 2, "{:?}", job.attempts);
        // A revival keeps the rows of the stages whose results it carries.
        store.stage(stage_done("j1", "b", 0, "s0")).await.unwrap();
        assert!(
            store
                .finish(finish("j1", "b", Status::Failed))
                .await
                .unwrap()
        );
        let mut revived = begin_job("j1", "c");
        revived.epoch = 1_763_900_001;
        revived.carried = vec!["s0".into()];
        store.begin(revived).await.unwrap();
        let job = Reader::open(&path).unwrap().job("j1").unwrap().unwrap();
        let statuses: Vec<_> = job.stages.iter().map(|s| s.status.as_str()).collect();
        assert_eq!(statuses, ["completed", "pending"]);
        drop(store);
        closer.close().await;
    }

    #[tokio::test]
    async fn poison_with_a_known_id_leaves_the_job_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "a")).await.unwrap();
        let poison = |id: &str| RecordJob {
            id: id.into(),
            kind: "nope".into(),
            queue: "default".into(),
            payload: "null".into(),
            status: Status::Failed,
            error: Some("unknown job type `nope`".into()),
            worker_id: "w1".into(),
            at: "2026-01-01T00:00:03.000Z".into(),
            overwrite: false,
        };
        store.record(poison("j1")).await.unwrap();
        store.record(poison("p1")).await.unwrap();
        drop(store);
        closer.close().await;
        let reader = Reader::open(&path).unwrap();
        let j1 = reader.job("j1").unwrap().unwrap();
        assert_eq!((j1.status.as_str(), j1.kind.as_str()), ("running", "t"));
        let p1 = reader.job("p1").unwrap().unwrap();
        assert_eq!(p1.status, "failed");
        assert_eq!(p1.error.as_deref(), Some("unknown job type `nope`"));
    }

    #[tokio::test]
    async fn a_handed_over_job_is_done_here_until_it_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (store, closer) = Store::open(&path).unwrap();
        store.begin(begin_job("j1", "a")).await.unwrap();
        store.stage(stage_done("j1", "a", 0, "s0")).await.unwrap();
        let mut handed = finish("j1", "a", Status::HandedOver);
        handed.progress = 50.0;
        handed.handed_to = Some(HandedTo {
            index: 1,
            stage: "s1".into(),
            pool: "b".into(),
        });
        assert!(store.finish(handed).await.unwrap());
        let reader = Reader::open(&path).unwrap();
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!(job.status, "handed_over");
        assert_eq!(job.finished_at.as_deref(), Some("2026-01-01T00:00:02.000Z"));
        // The stage it went on with, in its pool; no daemon named for it.
        assert_eq!(job.stage.as_deref(), Some("s1"));
        assert_eq!(job.stages[1].status, "pending");
        assert_eq!(job.stages[1].pool.as_deref(), Some("b"));
        assert_eq!(job.stages[1].worker_id, None);
        assert_eq!(job.stages[0].status, "completed");
        assert_eq!(job.attempts[0].status, "handed_over");
        // The job comes back (a later stage in this host's pool): not a
        // duplicate of a finished job; it runs again, with no end time.
        let prior = store.begin(begin_job("j1", "b")).await.unwrap();
        assert_eq!(prior.status, Some(Status::HandedOver));
        assert!(!prior.finished_for(0));
        assert_eq!(prior.results["s0"], serde_json::json!({"ok": true}));
        let job = reader.job("j1").unwrap().unwrap();
        assert_eq!((job.status.as_str(), job.finished_at), ("running", None));
        drop(store);
        closer.close().await;
    }
}
