//! `GET /metrics`: requests by endpoint and status, latency and queue-wait histograms, pages and
//! tokens generated, generations stopped early, queue depth, requests in flight, pages per decoding step.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

/// Seconds, ×2 from 10 ms to ~5.5 min: a Tiny page on a GPU up to a long Gundam PDF on a CPU.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub queue_wait: Histogram,
    pub pages: Counter,
    pub tokens: Counter,
    /// Generations stopped before their end because the client went away or the request timed out.
    pub cancelled: Counter,
    /// Requests admitted and waiting for the model.
    pub queue_depth: Gauge,
    /// Requests the model is working on (up to `--max-batch` at once).
    pub in_flight: Gauge,
    /// Pages in each decoding step (up to `--max-batch`).
    pub batch_pages: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dsocr");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let queue_wait = seconds_histogram();
        let (pages, tokens, cancelled) = (Counter::default(), Counter::default(), Counter::default());
        let (queue_depth, in_flight) = (Gauge::default(), Gauge::default());
        registry.register("http_requests", "HTTP requests by endpoint and status", requests.clone());
        registry.register("http_request_duration_seconds", "Time from request to the end of the response", latency.clone());
        registry.register("queue_wait_seconds", "Time an admitted request waited for the model", queue_wait.clone());
        registry.register("pages", "Pages recognised", pages.clone());
        registry.register("generated_tokens", "Tokens generated", tokens.clone());
        registry.register("cancelled_generations", "Generations stopped early: client gone or request timed out", cancelled.clone());
        registry.register("queue_depth", "Requests waiting for the model", queue_depth.clone());
        registry.register("in_flight", "Requests the model is working on", in_flight.clone());
        // 1, 2, 4, … 64 pages.
        let batch_pages = Histogram::new(exponential_buckets(1.0, 2.0, 7));
        registry.register("batch_pages", "Pages in each decoding step", batch_pages.clone());
        Self { registry, requests, latency, queue_wait, pages, tokens, cancelled, queue_depth, in_flight, batch_pages }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition (Prometheus scrapes it as is).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
