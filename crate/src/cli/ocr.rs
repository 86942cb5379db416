//! `dsocr ocr`: images, PDFs and folders in; text, markdown or JSON out.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, FloatDType};
use clap::ValueEnum;

use super::progress::{ProgressLine, batch_progress};
use crate::quant::{Preset, Recipe};
use crate::{Engine, EngineOptions, GenerationOptions, LoadOptions, Mode, OcrResult, RepeatGuard, Task};

#[derive(clap::Args)]
pub struct OcrArgs {
    /// Image files (PNG, JPEG, WebP, GIF, BMP, TIFF), PDFs (pages rendered at 144 dpi with poppler's
    /// pdftoppm) or directories.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Checkpoint: a directory in the hub layout (config.json, model-00001-of-000001.safetensors,
    /// tokenizer.json), a hub repo id (downloaded to the hub cache; HF_ENDPOINT, HF_HOME, HF_TOKEN honoured)
    /// or an http(s) base URL holding those files.
    #[arg(long, default_value = "deepseek-ai/DeepSeek-OCR")]
    model: String,
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
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Float type of weights and activations: f16/bf16 halve the memory (where the device supports them).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Quantize a float checkpoint's weights while loading (q4: int4 language model, int8 vision;
    /// q8: int8 throughout): the numbers of the checkpoint `dsocr quantize` writes.
    #[arg(long, value_enum)]
    quantize: Option<PresetArg>,
    /// Group size of --quantize (32, 64 or 128 values per scale).
    #[arg(long, requires = "quantize")]
    group: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PresetArg {
    Q4,
    Q8,
}

impl PresetArg {
    pub fn preset(self) -> Preset {
        match self {
            PresetArg::Q4 => Preset::Q4,
            PresetArg::Q8 => Preset::Q8,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Tiny,
    Small,
    Base,
    Large,
    Gundam,
}

#[derive(Clone, Copy, ValueEnum)]
enum GuardArg {
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

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Wgpu,
}

#[derive(Clone, Copy, ValueEnum)]
#[derive(Debug)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

fn parse_task(task: &str) -> Result<Task, String> {
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

/// The compute device and the engine settings it wants (a GPU's include its binding limit).
fn device(arg: DeviceArg) -> Result<(Device, EngineOptions), String> {
    match arg {
        DeviceArg::Cpu => Ok((Device::flex(), EngineOptions::default())),
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => {
            let (device, setup) = pollster::block_on(Device::wgpu_options().init_with_setup_async())
                .map_err(|e| format!("no usable GPU adapter (wgpu): {e:?}"))?;
            let max = crate::engine::wgpu_max_tensor_bytes(&setup);
            eprintln!("dsocr: GPU {} ({:?}), largest binding {} MiB", setup.adapter.get_info().name, setup.backend, max >> 20);
            Ok((device, EngineOptions::gpu(max)))
        }
        #[cfg(not(feature = "wgpu"))]
        DeviceArg::Wgpu => Err("this dsocr was built without the `wgpu` feature".into()),
    }
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

/// The pages of an input: an image file is one page; a PDF is rendered at 144 dpi (the official PDF
/// runner's zoom 2.0) by poppler's `pdftoppm`.
fn pages(file: &Path) -> Result<Vec<Page>, String> {
    if extension(file) != "pdf" {
        return Ok(vec![Page { number: None, bytes: std::fs::read(file).map_err(|e| e.to_string())? }]);
    }
    let dir = std::env::temp_dir().join(format!("dsocr-pdf-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let status = std::process::Command::new("pdftoppm")
        .args(["-r", "144", "-png"])
        .arg(file)
        .arg(dir.join("page"))
        .status()
        .map_err(|e| format!("PDF input needs poppler's pdftoppm (Debian/Ubuntu: apt-get install poppler-utils): {e}"))?;
    let result = if status.success() {
        // pdftoppm names pages page-1.png … or page-01.png …: order by the number.
        let mut rendered: Vec<(usize, PathBuf)> = std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let n = p.file_stem()?.to_str()?.strip_prefix("page-")?.parse().ok()?;
                Some((n, p))
            })
            .collect();
        rendered.sort();
        rendered
            .into_iter()
            .map(|(n, p)| Ok(Page { number: Some(n), bytes: std::fs::read(&p).map_err(|e| e.to_string())? }))
            .collect::<Result<Vec<_>, String>>()
    } else {
        Err(format!("pdftoppm could not render the PDF ({status})"))
    };
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(pages) if pages.is_empty() => Err("the PDF has no pages".into()),
        other => other,
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub fn run(args: &OcrArgs) -> Result<bool, String> {
    let task = parse_task(&args.task)?;
    let mode = match args.mode {
        ModeArg::Tiny => Mode::Tiny,
        ModeArg::Small => Mode::Small,
        ModeArg::Base => Mode::Base,
        ModeArg::Large => Mode::Large,
        ModeArg::Gundam => Mode::Gundam,
    };
    let generation = GenerationOptions {
        max_new_tokens: args.max_new_tokens,
        repeat_guard: match args.repeat_guard {
            GuardArg::Vllm => RepeatGuard::vllm(),
            GuardArg::Hf => RepeatGuard::hf(),
            GuardArg::Off => RepeatGuard::Off,
        },
        ..GenerationOptions::default()
    };
    let (device, mut engine) = device(args.device)?;
    engine.quantize = args.quantize.map(|p| Recipe::preset(p.preset(), args.group)).transpose().map_err(|e| e.to_string())?;
    let dtype = match args.dtype {
        DtypeArg::F32 => FloatDType::F32,
        DtypeArg::F16 => FloatDType::F16,
        DtypeArg::Bf16 => FloatDType::BF16,
    };
    let download = ProgressLine::default();
    let mut on_download = |file: &str, loaded: u64, total: Option<u64>| {
        let Some(total) = total.filter(|&t| t > 0) else { return };
        let mb = total as f64 / 1e6;
        download.update(loaded, total, |p| format!("downloading {file}: {p:>3}% of {mb:.1} MB"), || format!("downloaded {file} ({mb:.1} MB)"));
    };
    let load = ProgressLine::default();
    let load_started = std::time::Instant::now();
    let on_load = |loaded: u64, total: u64| {
        load.update(loaded, total, |p| format!("loading {}: {p:>3}%", args.model), || {
            format!("loaded {} in {:.1} s", args.model, load_started.elapsed().as_secs_f64())
        });
    };
    let options = LoadOptions {
        device,
        dtype,
        engine,
        on_download: Some(&mut on_download),
        on_load: Some(&on_load),
    };
    let engine = pollster::block_on(Engine::load(&args.model, options)).map_err(|e| e.to_string())?;
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
