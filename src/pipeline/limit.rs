//! `max_concurrent` on a stage: at most N runs at once of every stage of
//! that name, in this daemon or on this host.
//!
//! A daemon-wide limit is a semaphore. A host-wide limit is N lock files
//! next to the SQLite file (`<db>.limits/<stage>.<i>.lock`), held with
//! std's [`File::try_lock`] (`flock` on Unix): the daemons of a host share the SQLite file's directory already,
//! and the kernel drops a dead process's locks, so a SIGKILLed daemon never
//! leaks a slot.

use std::fs::{File, TryLockError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often a job waiting for a host-wide slot tries the locks again.
const HOST_POLL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub enum StageLimit {
    Daemon {
        max: u32,
        slots: Arc<Semaphore>,
    },
    Host {
        max: u32,
        /// `<dir>/<stage>.<i>.lock`, i in 0..max.
        dir: PathBuf,
        stage: String,
    },
}

/// A held slot; released on drop.
#[derive(Debug)]
pub enum LimitPermit {
    Daemon(#[allow(dead_code)] OwnedSemaphorePermit),
    /// The open, locked file: closing it releases the lock.
    Host(#[allow(dead_code)] File),
}

impl StageLimit {
    pub fn daemon(max: u32) -> Self {
        StageLimit::Daemon {
            max,
            slots: Arc::new(Semaphore::new(max as usize)),
        }
    }

    pub fn host(max: u32, dir: PathBuf, stage: &str) -> Self {
        StageLimit::Host {
            max,
            dir,
            stage: stage.to_owned(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            StageLimit::Daemon { max, .. } => format!("{max} at a time in this daemon"),
            StageLimit::Host { max, .. } => format!("{max} at a time on this host"),
        }
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> std::io::Result<Option<LimitPermit>> {
        match self {
            StageLimit::Daemon { slots, .. } => Ok(slots
                .clone()
                .try_acquire_owned()
                .ok()
                .map(LimitPermit::Daemon)),
            StageLimit::Host { max, dir, stage } => {
                std::fs::create_dir_all(dir)?;
                for i in 0..*max {
                    let path = dir.join(format!("{}.{i}.lock", lock_name(stage)));
                    let file = File::options()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)?;
                    // Exclusive and non-blocking; WouldBlock: another
                    // process (or another run here) holds this slot.
                    match file.try_lock() {
                        Ok(()) => return Ok(Some(LimitPermit::Host(file))),
                        Err(TryLockError::WouldBlock) => {}
                        Err(TryLockError::Error(err)) => return Err(err),
                    }
                }
                Ok(None)
            }
        }
    }

    /// Waits for a slot. A host-wide limit is polled; an I/O error (the
    /// lock directory cannot be written) is logged and retried, never
    /// turned into running without the limit.
    pub async fn acquire(&self) -> LimitPermit {
        match self {
            StageLimit::Daemon { slots, .. } => {
                // The semaphore is never closed.
                LimitPermit::Daemon(slots.clone().acquire_owned().await.expect("open semaphore"))
            }
            StageLimit::Host { dir, .. } => {
                let mut warned = false;
                loop {
                    match self.try_acquire() {
                        Ok(Some(p)) => return p,
                        Ok(None) => {}
                        Err(err) if !warned => {
                            tracing::error!(dir = %dir.display(), error = %err, "host_slot_failed");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                    tokio::time::sleep(HOST_POLL).await;
                }
            }
        }
    }
}

/// A stage name as a file name: anything but `[A-Za-z0-9._-]` becomes `_`.
fn lock_name(stage: &str) -> String {
    stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn daemon_limit_hands_out_max_slots() {
        let l = StageLimit::daemon(2);
        let a = l.try_acquire().unwrap().unwrap();
        let _b = l.try_acquire().unwrap().unwrap();
        assert!(l.try_acquire().unwrap().is_none());
        drop(a);
        assert!(l.try_acquire().unwrap().is_some());
    }

    #[tokio::test]
    async fn host_limit_is_shared_through_lock_files() {
        let dir = tempfile::tempdir().unwrap();
        // Two daemons of one host: two StageLimit values on one directory.
        let one = StageLimit::host(1, dir.path().join("limits"), "video gen");
        let other = StageLimit::host(1, dir.path().join("limits"), "video gen");
        let held = one.try_acquire().unwrap().unwrap();
        assert!(other.try_acquire().unwrap().is_none());
        let waiter = tokio::spawn(async move { other.acquire().await });
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!waiter.is_finished(), "the slot is taken");
        drop(held);
        let _got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("freed slot taken")
            .unwrap();
        assert!(dir.path().join("limits/video_gen.0.lock").exists());
    }
}
