//! `dsocr ocr`: images, PDFs and folders in; text, markdown or JSON out.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use clap::ValueEnum;

use super::model::ModelArgs;
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

/// Files of the inputs: files as given, directories walked recursively in name order.
fn collect_inputs(inputs: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            out.push(dir.to_path_buf()); // reported as unreadable later
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if path.is_dir() {
                walk(&path, out);
            } else if is_image(&path) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() { walk(input, &mut out) } else { out.push(input.clone()) }
    }
    out
}

fn extension(path: &Path) -> String {
    path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

fn is_image(path: &Path) -> bool {
    matches!(extension(path).as_str(), "png" | "jpg" | "jpeg" | "webp" | "gif" | "bmp" | "tif" | "tiff" | "pdf")
}

/// One image to recognise: a file, or one page of a PDF.
struct Page {
    /// 1-based page number for PDFs.
    number: Option<usize>,
    bytes: Vec<u8>,
}

/// The pages of an input: an image file is one page; a PDF one per page (see [`super::pdf`]).
fn pages(file: &Path) -> Result<Vec<Page>, String> {
    if extension(file) != "pdf" {
        return Ok(vec![Page { number: None, bytes: std::fs::read(file).map_err(|e| e.to_string())? }]);
    }
    Ok(super::pdf::render(file)?.into_iter().map(|(n, bytes)| Page { number: Some(n), bytes }).collect())
}

pub fn run(args: &OcrArgs) -> Result<bool, String> {
    let task = parse_task(&args.task)?;
    let mode = args.mode.mode();
    let generation = GenerationOptions {
        max_new_tokens: args.max_new_tokens,
        repeat_guard: args.repeat_guard.guard(),
        ..GenerationOptions::default()
    };
    let engine = args.model.load()?;
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
        let pages = match pages(file) {
            Ok(pages) => pages,
            Err(message) => {
                all_ok = false;
                eprintln!("dsocr: {}: {message}", file.display());
                json_results.push(json_entry(file, None, None, Some(&message)));
                continue;
            }
        };
        for page in pages {
            let label = match page.number {
                Some(p) => format!("{} page {p}", file.display()),
                None => file.display().to_string(),
            };
            let outcome = pollster::block_on(engine.recognize(&page.bytes, &task, mode, &generation, |event| {
                if stream {
                    print!("{}", event.text);
                    let _ = std::io::stdout().flush();
                }
                ControlFlow::Continue(())
            }))
            .map_err(|e| e.to_string());
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
                        write_outputs(out, file, page.number, &result)?;
                    }
                    json_results.push(json_entry(file, page.number, Some(&result), None));
                }
                Err(message) => {
                    all_ok = false;
                    eprintln!("dsocr: {label}: {message}");
                    json_results.push(json_entry(file, page.number, None, Some(&message)));
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
