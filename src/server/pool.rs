//! The LLM worker pool: N threads, each with its own llama.cpp context on the shared model,
//! behind a bounded queue. A full queue is refused at once (the caller answers 503) instead of
//! growing memory; a job whose client is gone by the time a worker takes it is skipped; a
//! worker that panics answers nothing and keeps serving. Before each job a worker takes the
//! bundle as it is now (an admin edit swaps it), and each job's queue wait and compute time are
//! added to the request's [`Timing`] (metrics and the request log).

use illmrec::recommender::{Recommender, Shared};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::RwLock;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce(&mut Recommender, Instant) + Send>;

/// Where a request's time went, gathered while it runs (a task-local set by the request
/// middleware; jobs run outside a request leave it alone).
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Waiting for a worker.
    pub queue: Duration,
    /// Running on a worker.
    pub compute: Duration,
    /// Prompt positions decoded (the cached task prefix not counted).
    pub decoded: usize,
}

tokio::task_local! {
    pub static TIMING: Cell<Timing>;
}

/// Adds positions decoded to the current request's timing.
pub fn count_decoded(n: usize) {
    let _ = TIMING.try_with(|t| {
        let mut v = t.get();
        v.decoded += n;
        t.set(v);
    });
}

/// Why a job was not run.
#[derive(Debug, PartialEq)]
pub enum PoolError {
    /// The queue is full.
    Busy,
    /// The pool is shutting down.
    Closed,
    /// The worker panicked or was stopped before answering.
    Lost,
}

pub struct Pool {
    tx: Mutex<Option<SyncSender<Job>>>,
    depth: Arc<AtomicUsize>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    pub contexts: usize,
    pub capacity: usize,
}

impl Pool {
    /// Starts one thread per recommender (each owns its context), with a queue of `capacity`
    /// jobs waiting beyond those being run.
    pub fn new(
        recommenders: Vec<Recommender>,
        capacity: usize,
        current: Arc<RwLock<Arc<Shared>>>,
    ) -> Self {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        let depth = Arc::new(AtomicUsize::new(0));
        let contexts = recommenders.len();
        let workers = recommenders
            .into_iter()
            .enumerate()
            .map(|(i, rec)| {
                let rx = rx.clone();
                let depth = depth.clone();
                let current = current.clone();
                std::thread::Builder::new()
                    .name(format!("llm-worker-{i}"))
                    .spawn(move || worker(rec, rx, depth, current))
                    .expect("cannot start a worker thread")
            })
            .collect();
        Self {
            tx: Mutex::new(Some(tx)),
            depth,
            workers: Mutex::new(workers),
            contexts,
            capacity,
        }
    }

    /// Jobs waiting for a worker.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Queues `f` for a worker and waits for its answer. Dropping the returned future (the
    /// client went away) makes a worker skip the job if it has not started it yet.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Recommender) -> T + Send + 'static,
    {
        let (answer, rx) = oneshot::channel();
        let queued = Instant::now();
        let job: Job = Box::new(move |rec, started| {
            if !answer.is_closed() {
                let value = f(rec);
                let _ = answer.send((value, started - queued, started.elapsed()));
            }
        });
        {
            let tx = self.tx.lock().unwrap();
            let Some(tx) = tx.as_ref() else {
                return Err(PoolError::Closed);
            };
            self.depth.fetch_add(1, Ordering::Relaxed);
            match tx.try_send(job) {
                Ok(()) => {}
                Err(e) => {
                    self.depth.fetch_sub(1, Ordering::Relaxed);
                    return Err(match e {
                        TrySendError::Full(_) => PoolError::Busy,
                        TrySendError::Disconnected(_) => PoolError::Closed,
                    });
                }
            }
        }
        let (value, queue, compute) = rx.await.map_err(|_| PoolError::Lost)?;
        let _ = TIMING.try_with(|t| {
            let mut v = t.get();
            v.queue += queue;
            v.compute += compute;
            t.set(v);
        });
        Ok(value)
    }

    /// Stops taking jobs, lets the workers finish those queued, and waits for them.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap().take();
        for w in self.workers.lock().unwrap().drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(
    mut rec: Recommender,
    rx: Arc<Mutex<Receiver<Job>>>,
    depth: Arc<AtomicUsize>,
    current: Arc<RwLock<Arc<Shared>>>,
) {
    loop {
        let job = match rx.lock().unwrap().recv() {
            Ok(job) => job,
            Err(_) => return, // the pool is shut down and the queue is empty
        };
        let started = Instant::now();
        depth.fetch_sub(1, Ordering::Relaxed);
        let now = current.read().unwrap().clone();
        if !Arc::ptr_eq(rec.shared(), &now) {
            // Same model by construction (Shared::reload): this cannot fail.
            let _ = rec.set_shared(now);
        }
        // A panic drops the job's answer channel: the caller gets PoolError::Lost.
        let _ = catch_unwind(AssertUnwindSafe(|| job(&mut rec, started)));
    }
}
