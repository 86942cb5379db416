//! PDF pages as PNG images, rendered at 144 dpi (the official PDF runner's zoom 2.0) by poppler's
//! `pdftoppm`: for `dsocr ocr` (files) and `dsocr serve` (request bodies).

use std::path::{Path, PathBuf};

#[cfg_attr(not(feature = "serve"), allow(dead_code))]
/// Whether `bytes` are a PDF (its header; the spec allows up to 1024 bytes of junk before it).
pub fn is_pdf(bytes: &[u8]) -> bool {
    bytes[..bytes.len().min(1024)].windows(5).any(|w| w == b"%PDF-")
}

/// The pages of the PDF file `file`, numbered from 1, as PNG bytes.
pub fn render(file: &Path) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let dir = scratch_dir()?;
    let result = render_into(file, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg_attr(not(feature = "serve"), allow(dead_code))]
/// The pages of a PDF held in memory (written to a private temporary file for `pdftoppm`).
pub fn render_bytes(pdf: &[u8]) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let dir = scratch_dir()?;
    let file = dir.join("input.pdf");
    let result = std::fs::write(&file, pdf).map_err(|e| format!("cannot write a temporary PDF: {e}")).and_then(|()| render_into(&file, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn scratch_dir() -> Result<PathBuf, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("dsocr-pdf-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn render_into(file: &Path, dir: &Path) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let output = std::process::Command::new("pdftoppm")
        .args(["-r", "144", "-png"])
        .arg(file)
        .arg(dir.join("page"))
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| format!("PDF input needs poppler's pdftoppm (Debian/Ubuntu: apt-get install poppler-utils): {e}"))?;
    if !output.status.success() {
        let why = String::from_utf8_lossy(&output.stderr);
        let why = why.lines().next().unwrap_or("").trim();
        return Err(format!("pdftoppm could not render the PDF ({}{}{why})", output.status, if why.is_empty() { "" } else { ": " }));
    }
    // pdftoppm names pages page-1.png … or page-01.png …: order by the number.
    let mut rendered: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p.file_stem()?.to_str()?.strip_prefix("page-")?.parse().ok()?;
            Some((n, p))
        })
        .collect();
    rendered.sort();
    if rendered.is_empty() {
        return Err("the PDF has no pages".into());
    }
    rendered.into_iter().map(|(n, p)| Ok((n, std::fs::read(&p).map_err(|e| e.to_string())?))).collect()
}
