//! PDF pages as PNG images, rendered at 144 dpi (the official PDF runner's zoom 2.0) by poppler's
//! `pdftoppm`, one page at a time: for `dsocr ocr` (files) and `dsocr serve` (request bodies).
//!
//! `pdfinfo` reads the page count and every page's size first, so a PDF with too many pages, or a
//! page that would render to more pixels than allowed, is refused before anything is rendered; each
//! poppler call has a time limit. Encrypted, empty and unreadable PDFs are errors that say so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Rendering resolution: the official runner's `fitz.Matrix(2, 2)`.
const DPI: f64 = 144.0;

/// Bounds on what a PDF may make dsocr do.
#[derive(Debug, Clone, Copy)]
pub struct PdfLimits {
    /// More pages than this: the whole PDF is refused.
    pub max_pages: usize,
    /// A page whose rendering would exceed this many pixels is refused (the other pages go on).
    pub max_pixels: u64,
    /// Longest a single `pdfinfo`/`pdftoppm` run may take before it is killed.
    pub timeout: Duration,
}

impl Default for PdfLimits {
    /// 1000 pages, 100 megapixels a page (an A0 poster at 144 dpi is 34 MP), 120 s per poppler call.
    fn default() -> Self {
        Self { max_pages: 1000, max_pixels: 100_000_000, timeout: Duration::from_secs(120) }
    }
}

#[cfg_attr(not(feature = "serve"), allow(dead_code))]
/// Whether `bytes` are a PDF (its header; the spec allows up to 1024 bytes of junk before it).
pub fn is_pdf(bytes: &[u8]) -> bool {
    bytes[..bytes.len().min(1024)].windows(5).any(|w| w == b"%PDF-")
}

/// A PDF whose pages can be rendered one by one. Holds a private scratch directory (removed on drop).
pub struct Pdf {
    file: PathBuf,
    scratch: PathBuf,
    /// Each page's size in pixels at 144 dpi.
    pages: Vec<(u64, u64)>,
    limits: PdfLimits,
}

impl Drop for Pdf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

impl Pdf {
    /// Reads the page count and page sizes of `file`.
    pub fn open(file: &Path, limits: PdfLimits) -> Result<Pdf, String> {
        let scratch = scratch_dir()?;
        let mut pdf = Pdf { file: file.to_path_buf(), scratch, pages: Vec::new(), limits };
        pdf.pages = pdf.page_sizes()?;
        Ok(pdf)
    }

    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    /// A PDF held in memory (written to a private temporary file for poppler).
    pub fn from_bytes(bytes: &[u8], limits: PdfLimits) -> Result<Pdf, String> {
        let scratch = scratch_dir()?;
        let file = scratch.join("input.pdf");
        let mut pdf = Pdf { file: file.clone(), scratch, pages: Vec::new(), limits };
        std::fs::write(&file, bytes).map_err(|e| format!("cannot write a temporary PDF: {e}"))?;
        pdf.pages = pdf.page_sizes()?;
        Ok(pdf)
    }

    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Page `number` (from 1) as PNG bytes.
    pub fn render(&self, number: usize) -> Result<Vec<u8>, String> {
        let &(w, h) = self.pages.get(number.wrapping_sub(1)).ok_or_else(|| format!("the PDF has no page {number}"))?;
        if w.saturating_mul(h) > self.limits.max_pixels {
            return Err(format!("the page is {w}×{h} pixels at 144 dpi, more than the limit of {} pixels", self.limits.max_pixels));
        }
        let prefix = self.scratch.join(format!("page-{number}"));
        let n = number.to_string();
        let mut command = Command::new("pdftoppm");
        command.args(["-r", "144", "-png", "-singlefile", "-f", &n, "-l", &n]).arg(&self.file).arg(&prefix);
        run(command, &self.scratch, "pdftoppm", self.limits.timeout)?;
        let png = prefix.with_extension("png");
        let bytes = std::fs::read(&png).map_err(|e| format!("pdftoppm wrote no page {number}: {e}"))?;
        let _ = std::fs::remove_file(&png);
        Ok(bytes)
    }

    /// `pdfinfo`'s page count and page sizes (points → pixels at 144 dpi).
    fn page_sizes(&self) -> Result<Vec<(u64, u64)>, String> {
        let mut command = Command::new("pdfinfo");
        // -l beyond the last page is clamped by pdfinfo; one more than allowed tells "too many".
        command.args(["-f", "1", "-l", &(self.limits.max_pages + 1).to_string()]).arg(&self.file);
        let info = run(command, &self.scratch, "pdfinfo", self.limits.timeout)?;
        let count: usize = info
            .lines()
            .find_map(|l| l.strip_prefix("Pages:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("pdfinfo did not report a page count")?;
        if count == 0 {
            return Err("the PDF has no pages".into());
        }
        if count > self.limits.max_pages {
            return Err(format!("the PDF has {count} pages, more than the limit of {} (--max-pdf-pages)", self.limits.max_pages));
        }
        // "Page    3 size: 595.276 x 841.89 pts (A4)"
        let sizes: Vec<(u64, u64)> = info
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("Page")?.trim_start();
                let (_, size) = rest.split_once(" size:")?;
                let mut parts = size.split_whitespace();
                let w: f64 = parts.next()?.parse().ok()?;
                let _x = parts.next()?;
                let h: f64 = parts.next()?.parse().ok()?;
                let px = |pts: f64| (pts.max(0.0) / 72.0 * DPI).ceil() as u64;
                Some((px(w), px(h)))
            })
            .collect();
        if sizes.len() != count {
            return Err(format!("pdfinfo reported {count} pages but {} page sizes", sizes.len()));
        }
        Ok(sizes)
    }
}

fn scratch_dir() -> Result<PathBuf, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("dsocr-pdf-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Runs a poppler tool with its output in files of `scratch` (no pipe to fill up), killed after
/// `timeout`; its stdout on success, its first error line explained otherwise.
fn run(mut command: Command, scratch: &Path, tool: &str, timeout: Duration) -> Result<String, String> {
    let out_path = scratch.join(format!("{tool}.out"));
    let err_path = scratch.join(format!("{tool}.err"));
    let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    command.stdin(Stdio::null()).stdout(file(&out_path)?).stderr(file(&err_path)?);
    let mut child = command
        .spawn()
        .map_err(|e| format!("PDF input needs poppler's {tool} (Debian/Ubuntu: apt-get install poppler-utils): {e}"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait().map_err(|e| format!("{tool}: {e}"))? {
            Some(status) => break status,
            None if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{tool} took longer than {} s on this PDF (stopped)", timeout.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if status.success() {
        return Ok(stdout);
    }
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    Err(explain(&stderr).unwrap_or_else(|| {
        let why = stderr.lines().last().unwrap_or("").trim();
        format!("{tool} could not read the PDF ({status}{}{why})", if why.is_empty() { "" } else { ": " })
    }))
}

/// The PDFs users meet most, in words.
fn explain(stderr: &str) -> Option<String> {
    if stderr.contains("Incorrect password") {
        Some("the PDF is encrypted: it needs a password".into())
    } else if stderr.contains("Invalid page count 0") {
        Some("the PDF has no pages".into())
    } else if stderr.contains("May not be a PDF file") || stderr.contains("Couldn't read xref table") || stderr.contains("Couldn't find trailer") {
        let why = stderr.lines().find(|l| l.contains("Error")).unwrap_or("").trim();
        Some(format!("not a readable PDF (damaged or not a PDF: {why})"))
    } else {
        None
    }
}
