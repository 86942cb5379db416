//! The model's own thread and the bounded queue in front of it. The thread keeps one
//! [`PageBatch`] for the whole service: up to `max_batch` requests decode together, one page of
//! each at a time, and a request that arrives while others decode joins them at the next step
//! (continuous batching) — a decoding step reads every active weight, so one step for several pages
//! costs little more than for one. Handlers wait on a channel of [`Event`]s and never block the
//! async runtime.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::error::ApiError;
use super::metrics::Metrics;
use crate::{Engine, Mode, OcrResult, PageBatch, Task, TokenEvent, GenerationOptions};

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
    max_batch: usize,
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
            max_batch,
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
                serve(&engine, &receiver, max_batch, &metrics, &average_ms);
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
                let per_place = self.average_ms.load(Ordering::Relaxed) * waiting / self.max_batch as u64;
                let seconds = per_place.div_ceil(1000).max(1);
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

/// A request the model is working on: one of its pages is in the batch (`page`), the others wait.
struct Running {
    job: Job,
    page: usize,
    started: Instant,
}

/// The model thread's loop: free places in the batch are filled from the queue (waiting for a
/// job only when nothing decodes), then one decoding step runs for every page in the batch; a
/// request's next page joins as soon as its page before ends. Returns when the queue is closed and
/// empty and nothing decodes.
fn serve(engine: &Engine, jobs: &std::sync::mpsc::Receiver<Job>, max_batch: usize, metrics: &Metrics, average_ms: &AtomicU64) {
    let mut batch = PageBatch::new(engine);
    let mut running: Vec<(u64, Running)> = Vec::new();
    let mut next_key = 0u64;
    loop {
        while running.len() < max_batch {
            let job = if running.is_empty() { jobs.recv().ok() } else { jobs.try_recv().ok() };
            let Some(job) = job else { break };
            metrics.queue_depth.dec();
            metrics.queue_wait.observe(job.admitted.elapsed().as_secs_f64());
            metrics.in_flight.inc();
            let mut request = Running { job, page: 0, started: Instant::now() };
            if join_next_page(&mut batch, next_key, &mut request, 0, metrics) {
                running.push((next_key, request));
            } else {
                end(request, metrics, average_ms);
            }
            next_key += 1;
        }
        if running.is_empty() {
            return; // the queue is closed
        }
        metrics.batch_pages.observe(batch.len() as f64);
        let on_token = |key: u64, token: &TokenEvent| {
            let (_, request) = running.iter().find(|(k, _)| *k == key).expect("a request per page");
            let sent = request.job.events.send(Event::Token { page: request.page, token: token.clone() });
            if sent.is_err() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let ended: Vec<(u64, Result<OcrResult, ApiError>)> =
            match std::panic::catch_unwind(AssertUnwindSafe(|| pollster::block_on(batch.step(on_token)))) {
                Ok(ended) => ended.into_iter().map(|(key, r)| (key, r.map_err(ApiError::from))).collect(),
                Err(_) => {
                    // The batch's state is unknown after a panic: every page in it fails.
                    batch = PageBatch::new(engine);
                    running.iter().map(|(key, _)| (*key, Err(internal()))).collect()
                }
            };
        for (key, outcome) in ended {
            let at = running.iter().position(|(k, _)| *k == key).expect("a request per page");
            let (_, mut request) = running.remove(at);
            if let Ok(result) = &outcome {
                metrics.pages.inc();
                metrics.tokens.inc_by(result.token_ids.len() as u64);
                if result.finish_reason == "cancelled" {
                    metrics.cancelled.inc();
                }
            }
            let page = request.page;
            let sent = request.job.events.send(Event::Page { page, outcome }).is_ok();
            if sent && join_next_page(&mut batch, key, &mut request, page + 1, metrics) {
                running.push((key, request));
            } else {
                end(request, metrics, average_ms);
            }
        }
    }
}

/// Joins the request's first page from `from` that can be prepared (a page that cannot gets its
/// error event at once). False when the request has no page left or its client went away.
fn join_next_page(batch: &mut PageBatch<'_, u64>, key: u64, request: &mut Running, from: usize, metrics: &Metrics) -> bool {
    let work = &request.job.work;
    for page in from..work.pages.len() {
        if request.job.events.is_closed() {
            metrics.cancelled.inc();
            return false;
        }
        let joined = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pollster::block_on(batch.join(key, &work.pages[page].bytes, &work.task, work.mode, &work.generation))
        }));
        let error = match joined {
            Ok(Ok(())) => {
                request.page = page;
                return true;
            }
            Ok(Err(e)) => ApiError::from(e),
            Err(_) => internal(),
        };
        if request.job.events.send(Event::Page { page, outcome: Err(error) }).is_err() {
            return false;
        }
    }
    false
}

/// A request is done: its place in the queue is given back (the job's permit is dropped).
fn end(request: Running, metrics: &Metrics, average_ms: &AtomicU64) {
    metrics.in_flight.dec();
    let ms = request.started.elapsed().as_millis() as u64;
    let old = average_ms.load(Ordering::Relaxed);
    average_ms.store(if old == 0 { ms } else { (old * 7 + ms) / 8 }, Ordering::Relaxed);
}

fn internal() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the model failed on this input (a bug: please report it)")
}
