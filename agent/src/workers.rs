//! The threads that serve authenticated monitors, kept for the next
//! connection once their monitor leaves. A new thread's first request
//! paid for its creation, its first scheduling (a new thread is placed
//! before it has run, often behind a busy vCPU thread) and its first
//! touch of a stack and a heap arena: 1.5 ms of the first extraction on
//! a new connection, measured against one already open. A kept thread is
//! only woken. At most [`MAX_IDLE`] wait, each for [`LINGER`].

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Idle threads kept at most.
pub const MAX_IDLE: usize = 4;
/// How long an idle thread waits for a connection before it ends.
pub const LINGER: Duration = Duration::from_secs(60);

type Job = Box<dyn FnOnce() + Send>;

/// The idle threads, each by the id it removes itself by.
#[derive(Debug, Default)]
pub struct Workers {
    idle: Mutex<Vec<(u64, Sender<Job>)>>,
    next_id: Mutex<u64>,
}

impl Workers {
    /// Runs `job` on an idle thread, or on a new one named `name`.
    pub fn run(self: &Arc<Self>, name: &str, mut job: Job) -> std::io::Result<()> {
        while let Some((_, tx)) = self.lock_idle().pop() {
            match tx.send(job) {
                Ok(()) => return Ok(()),
                // It ended between its timeout and removing itself.
                Err(e) => job = e.0,
            }
        }
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        let workers = self.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || workers.serve(id, job))
            .map(drop)
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Sender<Job>)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A thread's life: `job`, then each job handed to it while idle.
    fn serve(&self, id: u64, first: Job) {
        // Not the gate's short slice, which it inherits: a monitor's
        // batch may run a millisecond, and with a short slice a vCPU
        // would preempt it mid-batch.
        backdoor_proto::latency::default_slices();
        let mut job = first;
        loop {
            job();
            let (tx, rx) = channel::<Job>();
            {
                let mut idle = self.lock_idle();
                if idle.len() >= MAX_IDLE {
                    return;
                }
                idle.push((id, tx));
            }
            job = match rx.recv_timeout(LINGER) {
                Ok(j) => j,
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    let mut idle = self.lock_idle();
                    match idle.iter().position(|(i, _)| *i == id) {
                        Some(at) => {
                            idle.remove(at);
                            return;
                        }
                        // Taken just now: its job is on the way.
                        None => {
                            drop(idle);
                            match rx.recv() {
                                Ok(j) => j,
                                Err(_) => return,
                            }
                        }
                    }
                }
            };
        }
    }

    /// Idle threads now.
    pub fn idle(&self) -> usize {
        self.lock_idle().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn a_thread_that_finished_its_job_takes_the_next() {
        let w = Arc::new(Workers::default());
        let (tx, rx) = sync_channel(2);
        let t1 = tx.clone();
        w.run(
            "t",
            Box::new(move || t1.send(std::thread::current().id()).unwrap()),
        )
        .unwrap();
        let first = rx.recv().unwrap();
        while w.idle() == 0 {
            std::thread::yield_now();
        }
        w.run(
            "t",
            Box::new(move || tx.send(std::thread::current().id()).unwrap()),
        )
        .unwrap();
        assert_eq!(rx.recv().unwrap(), first, "the idle thread served it");
    }

    #[test]
    fn no_more_than_max_idle_threads_wait() {
        let w = Arc::new(Workers::default());
        let gate = Arc::new(std::sync::Barrier::new(MAX_IDLE + 3));
        for _ in 0..MAX_IDLE + 2 {
            let g = gate.clone();
            w.run(
                "t",
                Box::new(move || {
                    g.wait();
                }),
            )
            .unwrap();
        }
        gate.wait();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.idle() < MAX_IDLE && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The idle list never grows past MAX_IDLE: the others ended.
        assert_eq!(w.idle(), MAX_IDLE);
    }
}
