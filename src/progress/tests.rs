//! The publisher's drop policy, its record writes and the `job_completed`
//! result, without Redis (the channel's receiving end is the test's).

use super::*;

fn event(kind: &str, status: Status) -> ProgressEvent {
    ProgressEvent {
        job_id: "j1".into(),
        kind: "t".into(),
        queue: "q".into(),
        status,
        event: kind.into(),
        stage: None,
        stage_index: None,
        stages_total: 2,
        progress: 0.0,
        attempt: 1,
        worker_id: "w1".into(),
        message: None,
        ts: "2026-12-01T00:00:00.000Z".into(),
        seq: 1,
        result: None,
        result_truncated: None,
        result_key: None,
        result_field: None,
    }
}

fn publisher(history: &HistoryConfig) -> (Publisher, mpsc::UnboundedReceiver<Outgoing>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let publisher = Publisher {
        tx,
        keys: Keys::new("P"),
        dropped: Arc::new(AtomicU64::new(0)),
        queued: Arc::new(AtomicU64::new(0)),
        records: history.enabled().then_some(Bounds {
            retention_secs: history.retention_secs,
            max_jobs: history.max_jobs,
        }),
        max_message_result_bytes: history.max_message_result_bytes,
    };
    (publisher, rx)
}

#[test]
fn a_full_queue_drops_progress_reports_but_never_a_state_change() {
    let (p, mut rx) = publisher(&HistoryConfig::default());
    p.queued.store(CHANNEL_CAPACITY as u64, Ordering::Relaxed);
    let names = ["a".to_owned(), "b".to_owned()];
    let parts = || RecordParts {
        stage_names: &names,
        fence: record::Fence::Delivery("w1/t".into()),
        ..RecordParts::default()
    };
    p.send("c".into(), &event("progress", Status::Running), parts());
    assert_eq!(p.dropped(), 1);
    assert!(rx.try_recv().is_err(), "the progress report was dropped");
    for (kind, status) in [
        ("job_started", Status::Running),
        ("stage_completed", Status::Running),
        ("job_completed", Status::Completed),
        ("job_failed", Status::Failed),
        ("job_requeued", Status::Pending),
    ] {
        let mut ev = event(kind, status);
        // The delivery's first message is its start.
        ev.seq = if kind == "job_started" { 1 } else { 2 };
        p.send("c".into(), &ev, parts());
        let out = rx.try_recv().expect("a state change is queued");
        let (queue, write) = out.record.expect("with its record write");
        assert_eq!(queue, "q");
        assert_eq!(write.key, "P:{q}:job:j1");
        assert_eq!(write.ended_ms > 0, status.is_final(), "{kind}");
        let opens = match (kind, status) {
            ("job_started", _) => record::Opens::First,
            (_, Status::Pending) => record::Opens::Waits,
            _ => record::Opens::No,
        };
        assert_eq!(
            write.opens, opens,
            "a run starts or the job waits again: {kind}"
        );
        assert_eq!(write.fence, record::Fence::Delivery("w1/t".into()));
        let job: record::JobFields = serde_json::from_str(&write.job).unwrap();
        assert_eq!(job.status, status.as_str());
        assert_eq!(job.stages, names);
        let completed = status == Status::Completed;
        assert_eq!(job.result_field.is_some(), completed, "{kind}");
    }
    assert_eq!(p.dropped(), 1);
}

#[test]
fn records_off_queue_messages_without_a_write() {
    let off = HistoryConfig {
        retention_secs: 0,
        ..HistoryConfig::default()
    };
    let (p, mut rx) = publisher(&off);
    p.send(
        "c".into(),
        &event("job_started", Status::Running),
        RecordParts::default(),
    );
    assert!(rx.try_recv().unwrap().record.is_none());
    // A record-only message is sent to the task but not published.
    let parts = RecordParts {
        unpublished: true,
        ..RecordParts::default()
    };
    let (p, mut rx) = publisher(&HistoryConfig::default());
    p.send("c".into(), &event("stage_failed", Status::Running), parts);
    let out = rx.try_recv().unwrap();
    assert!(out.channel.is_none() && out.record.is_some());
}

#[test]
fn the_completed_message_carries_a_small_result_and_points_at_a_big_one() {
    let history = HistoryConfig {
        max_message_result_bytes: 16,
        ..HistoryConfig::default()
    };
    let (p, _rx) = publisher(&history);
    let mut ev = event("job_completed", Status::Completed);
    p.attach_result(&mut ev, 3, &serde_json::json!({"n": 1}));
    assert_eq!(ev.result, Some(serde_json::json!({"n": 1})));
    assert!(ev.result_truncated.is_none());
    let mut ev = event("job_completed", Status::Completed);
    p.attach_result(
        &mut ev,
        3,
        &serde_json::json!({"text": "longer than sixteen"}),
    );
    assert!(ev.result.is_none());
    assert_eq!(ev.result_truncated, Some(true));
    assert_eq!(ev.result_key.as_deref(), Some("P:{q}:job:j1"));
    assert_eq!(ev.result_field.as_deref(), Some("stage:3"));
    let off = HistoryConfig {
        retention_secs: 0,
        ..history
    };
    let (p, _rx) = publisher(&off);
    let mut ev = event("job_completed", Status::Completed);
    p.attach_result(
        &mut ev,
        3,
        &serde_json::json!({"text": "longer than sixteen"}),
    );
    assert_eq!(ev.result_truncated, Some(true));
    assert!(ev.result_key.is_none() && ev.result_field.is_none());
}

#[tokio::test]
async fn flushed_waits_for_the_messages_queued_before_it() {
    let (p, mut rx) = publisher(&HistoryConfig::default());
    let names = ["a".to_owned()];
    let parts = || RecordParts {
        stage_names: &names,
        fence: record::Fence::Delivery("w1/t".into()),
        ..RecordParts::default()
    };
    p.send(
        "c".into(),
        &event("stage_completed", Status::Running),
        parts(),
    );
    // The task: the message first, then the marker, told once "sent".
    let task = tokio::spawn(async move {
        let first = rx.recv().await.unwrap();
        assert!(first.record.is_some() && first.flushed.is_none());
        let marker = rx.recv().await.unwrap();
        assert!(marker.channel.is_none() && marker.record.is_none());
        marker.flushed.unwrap().send(()).unwrap();
        // A second marker nobody answers: the wait gives up.
        let unanswered = rx.recv().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        drop(unanswered);
    });
    assert!(p.flushed(std::time::Duration::from_secs(5)).await);
    assert!(!p.flushed(std::time::Duration::from_millis(50)).await);
    task.await.unwrap();
    // Records off: nothing to wait for.
    let off = HistoryConfig {
        retention_secs: 0,
        ..HistoryConfig::default()
    };
    let (p, _rx) = publisher(&off);
    assert!(p.flushed(std::time::Duration::from_millis(1)).await);
}

#[test]
fn writes_of_one_job_merge_only_when_fenced_alike() {
    let (p, mut rx) = publisher(&HistoryConfig::default());
    let names = ["a".to_owned()];
    let with = |fence: record::Fence| RecordParts {
        stage_names: &names,
        fence,
        ..RecordParts::default()
    };
    let a = || record::Fence::Delivery("w1/a".into());
    p.send(
        "c".into(),
        &event("stage_started", Status::Running),
        with(a()),
    );
    p.send(
        "c".into(),
        &event("stage_completed", Status::Running),
        with(a()),
    );
    // A message judged unrunnable with the same id, then the job's own.
    p.send(
        "c".into(),
        &event("job_failed", Status::Failed),
        with(record::Fence::OnlyNew),
    );
    p.send(
        "c".into(),
        &event("job_completed", Status::Completed),
        with(a()),
    );
    let mut batch = Vec::new();
    while let Ok(out) = rx.try_recv() {
        batch.push(out);
    }
    let writes = merge_writes(&mut batch);
    let fences: Vec<&record::Fence> = writes.iter().map(|(_, w)| &w.fence).collect();
    assert_eq!(fences, [&a(), &record::Fence::OnlyNew, &a()]);
    assert!(writes[2].1.ended_ms > 0, "the last write ends the job");
}
