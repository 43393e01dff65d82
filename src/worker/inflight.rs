//! The table of this daemon's in-flight deliveries.
//!
//! Every fetched entry is registered before its task starts and removed when
//! the task ends. The table answers three questions:
//! - which entries of our active lists belong to no task (orphans left by a
//!   BLMOVE whose reply was lost), for reconciliation after an outage;
//! - which runs hold which leases, for the heartbeat's lease and
//!   cancellation checks;
//! - how to stop one job's run (cancellation, lost lease).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

/// Why a run was stopped from outside, other than shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `conveyor cancel`.
    Cancelled,
    /// The delivery's lease is gone: the job was recovered and handed to
    /// another daemon. This run must not write anything more.
    LeaseLost,
}

/// Stops one run: its token is the parent of its stages' tokens.
pub struct RunStop {
    pub token: CancellationToken,
    reason: Mutex<Option<StopReason>>,
    /// Set before the run settles its delivery in Redis: from then on its
    /// lease may vanish by its own doing, so stops are no longer taken.
    settling: AtomicBool,
}

impl RunStop {
    pub fn new(token: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            token,
            reason: Mutex::new(None),
            settling: AtomicBool::new(false),
        })
    }

    /// The run is about to settle (its settle script checks the lease
    /// itself): a missing lease seen from now on is its own ack.
    pub fn begin_settling(&self) {
        self.settling.store(true, Ordering::SeqCst);
    }

    /// Stops the run unless it is already settling; returns whether it did.
    pub fn stop(&self, reason: StopReason) -> bool {
        if self.settling.load(Ordering::SeqCst) {
            return false;
        }
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        // A lost lease outranks a cancellation: nothing may be written.
        if *r != Some(StopReason::LeaseLost) {
            *r = Some(reason);
        }
        drop(r);
        self.token.cancel();
        true
    }

    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Entry {
    queue: String,
    /// The entry as fetched, and as rewritten by the claim.
    raws: Vec<Vec<u8>>,
    claim: Option<(String, String, Arc<RunStop>)>,
}

/// This daemon's in-flight deliveries, keyed by a per-fetch serial number.
#[derive(Default)]
pub struct InFlight {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

/// Removes its entry from the table when dropped (the run's task ended).
pub struct RunGuard {
    table: Arc<InFlight>,
    key: u64,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.table.lock().remove(&self.key);
    }
}

impl RunGuard {
    /// Registers the rewritten form of the entry (before the claim that
    /// writes it, so reconciliation never takes it for an orphan).
    pub fn add_raw(&self, raw: &[u8]) {
        if let Some(e) = self.table.lock().get_mut(&self.key) {
            e.raws.push(raw.to_vec());
        }
    }

    pub fn claimed(&self, job_id: &str, token: &str, stop: Arc<RunStop>) {
        if let Some(e) = self.table.lock().get_mut(&self.key) {
            e.claim = Some((job_id.to_owned(), token.to_owned(), stop));
        }
    }
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>, queue: &str, raw: &[u8]) -> RunGuard {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            key,
            Entry {
                queue: queue.to_owned(),
                raws: vec![raw.to_vec()],
                claim: None,
            },
        );
        RunGuard {
            table: self.clone(),
            key,
        }
    }

    /// Whether an entry of `queue`'s active list belongs to a run.
    pub fn owns(&self, queue: &str, raw: &[u8]) -> bool {
        self.lock()
            .values()
            .any(|e| e.queue == queue && e.raws.iter().any(|r| r == raw))
    }

    /// `(queue, job id, token)` of every claimed run.
    pub fn claims(&self) -> Vec<(String, String, String)> {
        self.lock()
            .values()
            .filter_map(|e| {
                let (id, token, _) = e.claim.as_ref()?;
                Some((e.queue.clone(), id.clone(), token.clone()))
            })
            .collect()
    }

    /// Stops the run of `job_id` (holding `token`, when given); returns
    /// whether one was found.
    pub fn stop(&self, job_id: &str, token: Option<&str>, reason: StopReason) -> bool {
        let stops: Vec<Arc<RunStop>> = self
            .lock()
            .values()
            .filter_map(|e| e.claim.as_ref())
            .filter(|(id, t, _)| id == job_id && token.is_none_or(|want| want == t))
            .map(|(_, _, stop)| stop.clone())
            .collect();
        let mut stopped = false;
        for stop in &stops {
            stopped |= stop.stop(reason);
        }
        stopped
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_entries_claims_and_stops() {
        let table = Arc::new(InFlight::default());
        let g = table.register("q", b"raw1");
        assert!(table.owns("q", b"raw1"));
        assert!(!table.owns("other", b"raw1"));
        g.add_raw(b"raw1b");
        assert!(table.owns("q", b"raw1b"));
        let stop = RunStop::new(CancellationToken::new());
        g.claimed("j1", "t1", stop.clone());
        assert_eq!(table.claims(), vec![("q".into(), "j1".into(), "t1".into())]);
        assert!(!table.stop("j1", Some("t0"), StopReason::LeaseLost));
        assert!(table.stop("j1", None, StopReason::Cancelled));
        assert!(stop.token.is_cancelled());
        assert_eq!(stop.reason(), Some(StopReason::Cancelled));
        stop.stop(StopReason::LeaseLost);
        stop.stop(StopReason::Cancelled);
        assert_eq!(stop.reason(), Some(StopReason::LeaseLost));

        // A run that began settling takes no more stops.
        let settling = RunStop::new(CancellationToken::new());
        let g2 = table.register("q", b"raw2");
        g2.claimed("j2", "t2", settling.clone());
        settling.begin_settling();
        assert!(!table.stop("j2", None, StopReason::LeaseLost));
        assert!(!settling.token.is_cancelled());
        assert_eq!(settling.reason(), None);
        drop((g, g2));
        assert!(table.is_empty());
    }
}
