//! `dsocr ocr`: images, PDFs and folders in; text, markdown or JSON out.

use std::collections::HashSet;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use clap::ValueEnum;

use super::gpu::{self, Fault};
use super::model::ModelArgs;
use super::pdf::{Pdf, PdfLimits};
use super::progress::batch_progress;
use crate::{GenerationOptions, Mode, OcrResult, RepeatGuard, Task};

#[derive(clap::Args)]
pub struct OcrArgs {
    /// Image files (PNG, JPEG, WebP, GIF, BMP, TIFF), PDFs (pages rendered at 144 dpi with poppler's
    /// pdftoppm) or directories.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value_t = ModeArg::Gundam)]
    mode: ModeArg,
    /// markdown | free | ocr | figure | describe | locate=TEXT | prompt=RAW
    #[arg(long, default_value = "markdown")]
    task: String,
    #[arg(long, default_value_t = 8192)]
    max_new_tokens: usize,
    /// vllm: the official windowed rule (n 30, window 90); hf: the hub code's no_repeat_ngram_size=20.
    #[arg(long, value_enum, default_value_t = GuardArg::Vllm)]
    repeat_guard: GuardArg,
    #[arg(long, value_enum, default_value_t = FormatArg::Markdown)]
    format: FormatArg,
    /// Also write <name>.md and <name>.json for each input into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Largest input file, in MiB: larger files are refused without being read.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_file_mib: u64,
    /// Most pages a PDF may have: a longer one is refused before any page is rendered.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_pdf_pages: u64,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ModeArg {
    Tiny,
    Small,
    Base,
    Large,
    Gundam,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum GuardArg {
    Vllm,
    Hf,
    Off,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum FormatArg {
    Text,
    Markdown,
    Json,
}

impl ModeArg {
    pub(crate) fn mode(self) -> Mode {
        match self {
            ModeArg::Tiny => Mode::Tiny,
            ModeArg::Small => Mode::Small,
            ModeArg::Base => Mode::Base,
            ModeArg::Large => Mode::Large,
            ModeArg::Gundam => Mode::Gundam,
        }
    }
}

impl GuardArg {
    pub(crate) fn guard(self) -> RepeatGuard {
        match self {
            GuardArg::Vllm => RepeatGuard::vllm(),
            GuardArg::Hf => RepeatGuard::hf(),
            GuardArg::Off => RepeatGuard::Off,
        }
    }
}

pub(crate) fn parse_task(task: &str) -> Result<Task, String> {
    Ok(match task {
        "markdown" => Task::Markdown,
        "free" => Task::FreeOcr,
        "ocr" => Task::Ocr,
        "figure" => Task::ParseFigure,
        "describe" => Task::Describe,
        _ => match task.split_once('=') {
            Some(("locate", text)) if !text.is_empty() => Task::Locate(text.into()),
            Some(("prompt", raw)) if !raw.is_empty() => Task::Raw(raw.replace("\\n", "\n")),
            _ => return Err(format!("unknown task {task:?} (markdown, free, ocr, figure, describe, locate=TEXT, prompt=RAW)")),
        },
    })
}

/// Files of the inputs: files as given, directories walked recursively in name order. A directory
/// reached again through a symlink (a loop, or two links to one place) is walked once.
fn collect_inputs(inputs: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(dir: &Path, seen: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) {
        if !std::fs::canonicalize(dir).is_ok_and(|real| seen.insert(real)) {
            return; // already walked (or vanished: nothing to report from it)
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            out.push(dir.to_path_buf()); // reported as unreadable later
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if path.is_dir() {
                walk(&path, seen, out);
            } else if is_image(&path) {
                out.push(path); // broken symlinks and special files included: they fail by name
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for input in inputs {
        if input.is_dir() { walk(input, &mut seen, &mut out) } else { out.push(input.clone()) }
    }
    out
}

/// Whether `file` is a regular file within the size limit, from its metadata alone (nothing is read,
/// so a FIFO or device never blocks and a file over the limit is never loaded).
fn check_input(file: &Path, max_bytes: u64) -> Result<(), String> {
    let meta = std::fs::metadata(file).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("is a directory that cannot be read".into());
    }
    if !meta.is_file() {
        return Err("not a regular file (a FIFO, socket or device)".into());
    }
    check_size(meta.len(), max_bytes)
}

/// The input's bytes, after [`check_input`].
fn read_input(file: &Path, max_bytes: u64) -> Result<Vec<u8>, String> {
    check_input(file, max_bytes)?;
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    check_size(bytes.len() as u64, max_bytes)?; // it may have grown since
    Ok(bytes)
}

fn check_size(len: u64, max_bytes: u64) -> Result<(), String> {
    if len > max_bytes {
        return Err(format!("the file is {len} bytes, more than the limit of {} MiB (--max-file-mib)", max_bytes >> 20));
    }
    Ok(())
}

fn extension(path: &Path) -> String {
    path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

fn is_image(path: &Path) -> bool {
    matches!(extension(path).as_str(), "png" | "jpg" | "jpeg" | "webp" | "gif" | "bmp" | "tif" | "tiff" | "pdf")
}

/// An input's pages: an image file is one page; a PDF one per page, each rendered when its turn
/// comes (see [`super::pdf`]), so a long PDF never sits in memory as images.
enum Pages {
    Image(Vec<u8>),
    Pdf(Pdf),
}

impl Pages {
    fn open(file: &Path, limits: PdfLimits, max_bytes: u64) -> Result<Pages, String> {
        if extension(file) != "pdf" {
            return Ok(Pages::Image(read_input(file, max_bytes)?));
        }
        check_input(file, max_bytes)?; // poppler reads the file itself
        Ok(Pages::Pdf(Pdf::open(file, limits)?))
    }

    /// `(page number for PDFs, that page's image bytes)` in order.
    fn each(self) -> Box<dyn Iterator<Item = (Option<usize>, Result<Vec<u8>, String>)>> {
        match self {
            Pages::Image(bytes) => Box::new(std::iter::once((None, Ok(bytes)))),
            Pages::Pdf(pdf) => Box::new((1..=pdf.page_count()).map(move |n| (Some(n), pdf.render(n)))),
        }
    }
}

pub fn run(args: &OcrArgs) -> Result<bool, String> {
    let task = parse_task(&args.task)?;
    let mode = args.mode.mode();
    let generation = GenerationOptions {
        max_new_tokens: args.max_new_tokens,
        repeat_guard: args.repeat_guard.guard(),
        ..GenerationOptions::default()
    };
    let max_bytes = args.max_file_mib << 20;
    let engine = args.model.load_with(|engine| engine.decode_limits.max_bytes = max_bytes)?;
    // A mode the checkpoint's model does not have (DeepSeek-OCR-2: base and gundam only) fails here,
    // before any input is read.
    mode.geometry(engine.config().version()).map_err(|e| e.to_string())?;
    let pdf_limits = PdfLimits { max_pages: args.max_pdf_pages as usize, max_pixels: engine.options().decode_limits.max_pixels, ..PdfLimits::default() };
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    }

    let files = collect_inputs(&args.inputs);
    if files.is_empty() {
        return Err("no image inputs found".into());
    }
    let stream = files.len() == 1 && extension(&files[0]) != "pdf" && args.format != FormatArg::Json;
    let mut all_ok = true;
    let mut json_results = Vec::new();
    let batch_started = std::time::Instant::now();
    for (n, file) in files.iter().enumerate() {
        if files.len() > 1 {
            eprintln!("dsocr: {} {}", batch_progress(n, files.len(), batch_started.elapsed()), file.display());
        }
        let pages = match Pages::open(file, pdf_limits, max_bytes) {
            Ok(pages) => pages,
            Err(message) => {
                all_ok = false;
                eprintln!("dsocr: {}: {message}", file.display());
                json_results.push(json_entry(file, None, None, Some(&message)));
                continue;
            }
        };
        for (number, bytes) in pages.each() {
            let label = match number {
                Some(p) => format!("{} page {p}", file.display()),
                None => file.display().to_string(),
            };
            let outcome = bytes.and_then(|bytes| {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pollster::block_on(engine.recognize(&bytes, &task, mode, &generation, |event| {
                        if stream {
                            print!("{}", event.text);
                            let _ = std::io::stdout().flush();
                        }
                        gpu::after_token(event.index);
                        ControlFlow::Continue(())
                    }))
                }));
                match run {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(payload) => Err(format!("internal error: {}", Fault::of_panic(&*payload))),
                }
            });
            // A GPU fault ends the batch: every later input would fail the same way.
            if let Err(message) = &outcome
                && let Some(fault) = Fault::probe(engine.device(), message)
            {
                if args.format == FormatArg::Json {
                    json_results.push(json_entry(file, number, None, Some(message)));
                    println!("{}", serde_json::json!({ "results": json_results }));
                }
                return Err(fault.message(&format!("recognizing {label}")));
            }
            match outcome {
                Ok(result) => {
                    if stream {
                        println!();
                    } else if args.format != FormatArg::Json {
                        println!("{}", if args.format == FormatArg::Text { &result.text } else { &result.markdown });
                    }
                    if result.ended_without_eos {
                        eprintln!("dsocr: {label}: generation ended without EOS ({})", result.finish_reason);
                    }
                    if let Some(out) = &args.out {
                        write_outputs(out, file, number, &result)?;
                    }
                    json_results.push(json_entry(file, number, Some(&result), None));
                }
                Err(message) => {
                    all_ok = false;
                    eprintln!("dsocr: {label}: {message}");
                    json_results.push(json_entry(file, number, None, Some(&message)));
                }
            }
        }
    }
    if args.format == FormatArg::Json {
        println!("{}", serde_json::json!({ "results": json_results }));
    }
    Ok(all_ok)
}

fn json_entry(file: &Path, page: Option<usize>, result: Option<&OcrResult>, error: Option<&str>) -> serde_json::Value {
    let mut entry = match result {
        Some(r) => serde_json::to_value(r).unwrap_or_default(),
        None => serde_json::json!({}),
    };
    entry["input"] = file.display().to_string().into();
    entry["page"] = page.map_or(serde_json::Value::Null, serde_json::Value::from);
    if let Some(error) = error {
        entry["error"] = error.into();
    }
    entry
}

fn write_outputs(out: &Path, file: &Path, page: Option<usize>, result: &OcrResult) -> Result<(), String> {
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("output");
    let stem = match page {
        Some(p) => format!("{name}-page{p}"),
        None => name.to_string(),
    };
    let write = |name: String, body: String| std::fs::write(out.join(&name), body).map_err(|e| format!("{}: {e}", out.join(name).display()));
    write(format!("{stem}.md"), result.markdown.clone())?;
    write(format!("{stem}.json"), serde_json::to_string_pretty(result).unwrap_or_default())
}
