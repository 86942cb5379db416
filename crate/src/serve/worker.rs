//! The model's own thread and the bounded queue in front of it. The thread takes the requests that
//! are waiting (up to `max_batch`) and decodes their pages together — a decoding step reads every
//! active weight, so one step for several pages costs little more than for one
//! ([`Engine::recognize_batch`]); requests that arrive meanwhile wait for the next batch. Handlers wait
//! on a channel of [`Event`]s and never block the async runtime.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::error::ApiError;
use super::metrics::Metrics;
use crate::{Engine, GenerationOptions, Mode, OcrResult, Task, TokenEvent};

/// One image to recognise: an image file, or one rendered page of a PDF (numbered from 1).
pub struct PageInput {
    pub number: Option<usize>,
    pub bytes: Vec<u8>,
}

/// What a request asks of the model.
pub struct Work {
    pub pages: Vec<PageInput>,
    pub task: Task,
    pub mode: Mode,
    pub generation: GenerationOptions,
}

/// What the model thread sends back, in order: each page's tokens, then that page's outcome.
pub enum Event {
    Token { page: usize, token: TokenEvent },
    Page { page: usize, outcome: Result<OcrResult, ApiError> },
}

struct Job {
    work: Work,
    events: mpsc::UnboundedSender<Event>,
    admitted: Instant,
    _permit: OwnedSemaphorePermit,
}

/// The queue: admission (bounded, 429 when full), the model thread's state, its metrics.
pub struct Queue {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    permits: Arc<Semaphore>,
    /// Set once the model has loaded (a failed load ends the server instead).
    ready: Arc<AtomicBool>,
    /// Moving average of a request's time with the model, for `Retry-After`.
    average_ms: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
}

/// A place in the queue, taken before the request's body is turned into work.
pub struct Admission(OwnedSemaphorePermit);

impl Queue {
    /// Starts the model thread: it loads the engine with `load`, then runs jobs until the queue is
    /// closed. `on_load` hears how loading ended. `max_waiting` requests may wait while up to
    /// `max_batch` run together.
    pub fn start(
        load: impl FnOnce() -> Result<Engine, String> + Send + 'static,
        on_load: impl FnOnce(Result<(), String>) + Send + 'static,
        max_waiting: usize,
        max_batch: usize,
        metrics: Arc<Metrics>,
    ) -> (Arc<Queue>, std::thread::JoinHandle<()>) {
        let max_batch = max_batch.max(1);
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Queue {
            jobs: Mutex::new(Some(sender)),
            permits: Arc::new(Semaphore::new(max_waiting + max_batch)),
            ready: Arc::new(AtomicBool::new(false)),
            average_ms: Arc::new(AtomicU64::new(0)),
            metrics: metrics.clone(),
        });
        let (ready, average_ms) = (queue.ready.clone(), queue.average_ms.clone());
        let thread = std::thread::Builder::new()
            .name("dsocr-model".into())
            .spawn(move || {
                let engine = match load() {
                    Ok(engine) => engine,
                    Err(message) => {
                        on_load(Err(message));
                        return;
                    }
                };
                ready.store(true, Ordering::SeqCst);
                on_load(Ok(()));
                while let Ok(first) = receiver.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < max_batch {
                        match receiver.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    let started = Instant::now();
                    run(&engine, jobs, &metrics);
                    let ms = started.elapsed().as_millis() as u64;
                    let old = average_ms.load(Ordering::Relaxed);
                    average_ms.store(if old == 0 { ms } else { (old * 7 + ms) / 8 }, Ordering::Relaxed);
                }
            })
            .expect("the OS refused a thread for the model");
        (queue, thread)
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// A place in the queue, or 503 while the model loads, 429 (with `Retry-After`) when full.
    pub fn admit(&self) -> Result<Admission, ApiError> {
        if !self.ready() {
            let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the model is still loading");
            error.retry_after = Some(5);
            return Err(error);
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admission(permit)),
            Err(_) => {
                let waiting = self.metrics.queue_depth.get().max(0) as u64 + 1;
                let seconds = (self.average_ms.load(Ordering::Relaxed) * waiting).div_ceil(1000).max(1);
                let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", "the queue is full; retry later");
                error.retry_after = Some(seconds);
                Err(error)
            }
        }
    }

    /// Queues `work`; its events arrive on the receiver. Dropping the receiver (the client went
    /// away, the request timed out) stops the generation at its next token.
    pub fn submit(&self, admission: Admission, work: Work) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (events, receiver) = mpsc::unbounded_channel();
        let job = Job { work, events, admitted: Instant::now(), _permit: admission.0 };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let sent = jobs.as_ref().map(|jobs| jobs.send(job).is_ok()).unwrap_or(false);
        if !sent {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down"));
        }
        self.metrics.queue_depth.inc();
        Ok(receiver)
    }

    /// No more jobs: the model thread finishes those queued, then ends.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Runs `jobs` together: in round r, page r of every job that has one (and whose client is still
/// there) is decoded in one batch; a job's events go out as its pages finish.
fn run(engine: &Engine, jobs: Vec<Job>, metrics: &Metrics) {
    for job in &jobs {
        metrics.queue_depth.dec();
        metrics.queue_wait.observe(job.admitted.elapsed().as_secs_f64());
        metrics.in_flight.inc();
    }
    let mut open: Vec<bool> = vec![true; jobs.len()];
    for round in 0.. {
        // (job, page) of this round.
        let mut members = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            if !open[j] {
                continue;
            }
            if round >= job.work.pages.len() || job.events.is_closed() {
                if round < job.work.pages.len() {
                    metrics.cancelled.inc();
                }
                open[j] = false;
                metrics.in_flight.dec();
                continue;
            }
            members.push(j);
        }
        if members.is_empty() {
            return;
        }
        metrics.batch_pages.observe(members.len() as f64);
        let pages: Vec<(&[u8], &Task, Mode, &GenerationOptions)> = members
            .iter()
            .map(|&j| {
                let work = &jobs[j].work;
                (work.pages[round].bytes.as_slice(), &work.task, work.mode, &work.generation)
            })
            .collect();
        let on_token = |row: usize, token: &TokenEvent| {
            let sent = jobs[members[row]].events.send(Event::Token { page: round, token: token.clone() });
            if sent.is_err() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let outcomes: Vec<Result<OcrResult, ApiError>> =
            match std::panic::catch_unwind(AssertUnwindSafe(|| pollster::block_on(engine.recognize_batch(&pages, on_token)))) {
                Ok(results) => results.into_iter().map(|r| r.map_err(ApiError::from)).collect(),
                Err(_) => members
                    .iter()
                    .map(|_| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the model failed on this input (a bug: please report it)")))
                    .collect(),
            };
        for (&j, outcome) in members.iter().zip(outcomes) {
            if let Ok(result) = &outcome {
                metrics.pages.inc();
                metrics.tokens.inc_by(result.token_ids.len() as u64);
                if result.finish_reason == "cancelled" {
                    metrics.cancelled.inc();
                }
            }
            if jobs[j].events.send(Event::Page { page: round, outcome }).is_err() {
                open[j] = false;
                metrics.in_flight.dec();
            }
        }
    }
}
