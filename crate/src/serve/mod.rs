//! `dsocr serve` (feature `serve`, native only): the model loaded once behind an HTTP service.
//!
//! The flow: [`http`] (router, auth, metrics middleware, `/v1/ocr`) and [`openai`]
//! (`/v1/chat/completions`) turn requests into [`worker::Work`]; [`worker::Queue`] admits them
//! (bounded, 429 when full) and hands them to the model's own thread, which streams tokens and
//! results back; a request whose client goes away or whose time runs out stops its generation.
//! SIGTERM stops accepting connections and finishes the requests in flight.

mod error;
mod http;
mod metrics;
mod openai;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cli::model::ModelArgs;
use crate::cli::ocr::ModeArg;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (0.0.0.0 for every interface, as in a container).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// File holding the API key clients must send as `Authorization: Bearer KEY` (/v1/* and
    /// /metrics; /healthz and /readyz stay open for probes). Without it the service is open.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Largest request body (image, PDF or JSON with a data URL), in MiB: larger ones get 413.
    #[arg(long, default_value_t = 32)]
    max_body_mb: usize,
    /// Requests that may wait while others run; more get 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    max_queue: usize,
    /// Requests whose pages are decoded together (each decoding step reads the weights once for all
    /// of them; a request arriving meanwhile joins at the next step); 1 runs one at a time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    max_batch: u64,
    /// Per-request limit (queue wait included), in seconds: then 504, and the generation stops.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Mode of requests that name none.
    #[arg(long, value_enum, default_value_t = ModeArg::Gundam)]
    mode: ModeArg,
    /// Default and upper bound of a request's max_new_tokens / max_tokens.
    #[arg(long, default_value_t = 8192)]
    max_new_tokens: usize,
    /// Let /v1/chat/completions fetch http(s) image URLs (off: only data: URLs).
    #[arg(long)]
    allow_remote_images: bool,
}

pub fn run(args: ServeArgs) -> Result<(), String> {
    let api_key = match &args.api_key_file {
        Some(file) => {
            let key = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("{}: the API key file is empty", file.display()));
            }
            Some(<[u8; 32]>::from(Sha256::digest(key.as_bytes())))
        }
        None => None,
    };
    if args.max_new_tokens == 0 {
        return Err("--max-new-tokens must be at least 1".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(serve(args, api_key))
}

async fn serve(args: ServeArgs, api_key: Option<[u8; 32]>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("dsocr: listening on http://{address} (ready once the model has loaded: GET /readyz)");

    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let model_id = args.model.model.clone();
    let started_loading = std::time::Instant::now();
    let model = args.model;
    let default_mode = args.mode.mode();
    let (queue, thread) = worker::Queue::start(
        move || {
            let engine = model.load()?;
            // `--mode` must exist for the checkpoint's model (DeepSeek-OCR-2: base, gundam).
            default_mode.geometry(engine.config().version()).map_err(|e| format!("--mode: {e}"))?;
            Ok(engine)
        },
        move |outcome| {
            let _ = loaded_tx.send(outcome);
        },
        args.max_queue,
        args.max_batch as usize,
        Arc::new(metrics::Metrics::default()),
    );
    let app = Arc::new(http::App {
        queue: queue.clone(),
        model_id,
        api_key,
        default_mode: args.mode.mode(),
        max_new_tokens: args.max_new_tokens,
        timeout: Duration::from_secs(args.timeout_s),
        allow_remote_images: args.allow_remote_images,
        max_body_bytes: args.max_body_mb << 20,
        started: http::unix_now(),
    });

    let load_failure = Arc::new(std::sync::Mutex::new(None));
    let failure = load_failure.clone();
    let shutdown = async move {
        let loaded = async {
            match loaded_rx.await {
                Ok(Ok(())) => {
                    eprintln!("dsocr: ready ({:.1} s)", started_loading.elapsed().as_secs_f64());
                    std::future::pending::<()>().await
                }
                Ok(Err(message)) => *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(message),
                Err(_) => *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some("the model thread ended".to_string()),
            }
        };
        tokio::select! {
            () = loaded => {}
            () = terminate() => eprintln!("dsocr: shutting down: finishing the requests in flight"),
        }
    };
    axum::serve(listener, http::router(app)).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())?;
    queue.close();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    match load_failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(message) => Err(message),
        None => {
            eprintln!("dsocr: stopped");
            Ok(())
        }
    }
}

/// SIGTERM (what Kubernetes and docker send) or Ctrl-C.
async fn terminate() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let sigterm = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let sigterm = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = sigterm => {}
    }
}
