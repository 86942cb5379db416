//! The bad-input battery: what users really hand an OCR engine — empty, random and truncated files,
//! wrong extensions, 16-bit/palette/grey-alpha PNGs, CMYK and progressive JPEGs, EXIF rotations of odd
//! sizes, animated GIFs, WebP, 1 × N strips, dimension and decompression bombs, PDFs without pages,
//! encrypted or damaged, oversized files, FIFOs, broken symlinks and symlink loops. Each input gives a
//! typed error or the documented result, in bounded time and memory; in a batch every other input
//! still gets its result and the exit code is 1. The files Rust cannot make are committed
//! (`tests/fixtures/bad/`, written by its `make.py`); the rest are made here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views};
use dsocr::{Error, Mode};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn bad(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("bad").join(name)).unwrap_or_else(|e| panic!("tests/fixtures/bad/{name}: {e}"))
}

/// Deterministic junk.
fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

/// The result users get from the library for `bytes`: the oriented size, and every mode's views
/// built, or the error.
fn outcome(bytes: &[u8], limits: &DecodeLimits) -> Result<[u32; 2], Error> {
    let image = decode(bytes, limits)?;
    for mode in Mode::ALL {
        let views = make_views(&image, mode, &PreprocessOptions::default())?;
        assert_eq!(views.original_size, [image.width(), image.height()]);
    }
    Ok([image.width(), image.height()])
}

#[test]
fn odd_but_valid_images_decode_as_documented() {
    let limits = DecodeLimits::default();
    for (name, size) in [
        ("cmyk.jpg", [64, 48]),
        ("progressive.jpg", [64, 48]),
        ("exif6-odd.jpg", [23, 37]), // stored 37 × 23, rotated by its EXIF orientation
        ("exif8-odd.jpg", [23, 37]),
        ("exif3-odd.jpg", [37, 23]),
        ("grey16.png", [40, 30]),
        ("palette.png", [40, 30]),
        ("grey-alpha.png", [40, 30]),
        ("animated.gif", [32, 24]),
        ("lossy.webp", [48, 32]),
        ("lossless.webp", [48, 32]),
        ("strip-1x2000.png", [1, 2000]),
        ("strip-2000x1.png", [2000, 1]),
    ] {
        let got = outcome(&bad(name), &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, size, "{name}");
    }
    // An animated GIF is its first frame (red), as in Pillow.
    let gif = decode(&bad("animated.gif"), &limits).unwrap();
    assert_eq!(gif.get_pixel(5, 5).0, [255, 0, 0]);
    // 16-bit grey 40000 → 8-bit 40000 >> 8, replicated.
    let grey = decode(&bad("grey16.png"), &limits).unwrap();
    assert_eq!(grey.get_pixel(0, 0).0, [156, 156, 156]);
    // CMYK is converted to RGB (not refused), close to the RGB original's colours.
    let cmyk = decode(&bad("cmyk.jpg"), &limits).unwrap();
    let rgb = decode(&bad("progressive.jpg"), &limits).unwrap();
    let diff = cmyk.pixels().zip(rgb.pixels()).map(|(a, b)| (0..3).map(|c| (a[c] as i32 - b[c] as i32).abs()).max().unwrap()).max().unwrap();
    assert!(diff < 48, "CMYK → RGB off by {diff}");
}

#[test]
fn bombs_are_refused_from_their_header_or_decoded_within_bounds() {
    let limits = DecodeLimits::default();
    for name in ["bomb-header.png", "bomb-144mpx.png"] {
        let started = Instant::now();
        match outcome(&bad(name), &limits) {
            Err(Error::ImageTooLarge { width, height, max_pixels }) => {
                assert!(u64::from(width) * u64::from(height) > max_pixels, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1), "{name} is refused before its pixels are inflated");
    }
    // 17 KB that inflate to 64 M pixels: under the limit, so decoded (every mode's views built).
    let started = Instant::now();
    assert_eq!(outcome(&bad("bomb-64mpx.png"), &limits).unwrap(), [8000, 8000]);
    eprintln!("bomb-64mpx.png: decoded and viewed in every mode in {:.1} s", started.elapsed().as_secs_f64());
    // A lower limit refuses it; so does a byte limit below the file's size.
    let small = DecodeLimits { max_pixels: 10_000_000, ..limits };
    assert!(matches!(outcome(&bad("bomb-64mpx.png"), &small), Err(Error::ImageTooLarge { width: 8000, height: 8000, .. })));
    let tight = DecodeLimits { max_bytes: 1000, ..limits };
    assert!(matches!(outcome(&bad("bomb-64mpx.png"), &tight), Err(Error::InputTooLarge { max_bytes: 1000, .. })));
}

#[test]
fn junk_and_truncated_files_are_typed_errors() {
    let limits = DecodeLimits::default();
    let not_images: [(&str, Vec<u8>); 4] = [
        ("empty", Vec::new()),
        ("random bytes", random_bytes(4096, 7)),
        ("HTML saved as .png", b"<!doctype html><html><body><img src=page.png></body></html>".to_vec()),
        ("a PDF given as an image", bad("encrypted.pdf")),
    ];
    for (name, bytes) in not_images {
        assert!(matches!(outcome(&bytes, &limits), Err(Error::ImageFormat(_))), "{name}: {:?}", outcome(&bytes, &limits));
    }
    // Truncations at several offsets: a typed error, or — where the decoder recovers what it has (a
    // JPEG, GIF or lossy WebP cut short: the missing part comes out grey or black; a PNG missing only
    // its end chunk) — an image of the full size. Never a panic.
    let page = std::fs::read(fixtures().join("images/page.png")).unwrap();
    let mut recovered = Vec::new();
    for (name, bytes) in [("page.png", page), ("progressive.jpg", bad("progressive.jpg")), ("cmyk.jpg", bad("cmyk.jpg")), ("lossy.webp", bad("lossy.webp")), ("lossless.webp", bad("lossless.webp")), ("animated.gif", bad("animated.gif"))] {
        let full = outcome(&bytes, &limits).unwrap();
        let n = bytes.len();
        for cut in [1, 4, 8, 12, 16, 24, 33, n / 4, n / 2, 3 * n / 4, n - 16, n - 2, n - 1] {
            match outcome(&bytes[..cut], &limits) {
                Err(Error::ImageFormat(_) | Error::ImageDecode(_)) => {}
                Ok(size) => {
                    assert_eq!(size, full, "{name} cut at {cut}: a recovered image has the full size");
                    recovered.push(format!("{name}@{cut}"));
                }
                Err(e) => panic!("{name} cut at {cut}: {e:?}"),
            }
        }
    }
    eprintln!("truncations recovered by the decoders: {recovered:?}");
    // A PNG decodes only when nothing but (part of) its 12-byte end chunk is missing.
    let png_len = std::fs::metadata(fixtures().join("images/page.png")).unwrap().len() as usize;
    for r in recovered.iter().filter(|r| r.starts_with("page.png@")) {
        let cut: usize = r["page.png@".len()..].parse().unwrap();
        assert!(cut >= png_len - 12, "a PNG cut inside its pixel data never decodes: {r}");
    }
}

/// `dsocr ocr` over one folder holding the whole battery: every input gets its own entry (a result
/// or an error saying what is wrong), the batch finishes, exit code 1, bounded time and memory.
#[test]
fn cli_batch_over_the_battery_finishes_with_an_entry_per_input() {
    let dir = std::env::temp_dir().join(format!("dsocr-battery-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("folder.png")).unwrap();
    for entry in std::fs::read_dir(fixtures().join("bad")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e != "py") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let page = std::fs::read(fixtures().join("images/page.png")).unwrap();
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    std::fs::write(dir.join("random.jpg"), random_bytes(4096, 11)).unwrap();
    std::fs::write(dir.join("saved-page.html.png"), b"<!doctype html><title>not an image</title>").unwrap();
    std::fs::write(dir.join("truncated.png"), &page[..page.len() / 2]).unwrap();
    std::fs::write(dir.join("png-named.jpg"), &page).unwrap(); // the content decides, not the name
    std::fs::write(dir.join("folder.png").join("inside.png"), &page).unwrap();
    std::fs::copy(fixtures().join("images/doc.pdf"), dir.join("two-pages.pdf")).unwrap();
    // Over --max-file-mib (sparse: nothing is written or read).
    std::fs::File::create(dir.join("huge.png")).unwrap().set_len(600 << 20).unwrap();
    std::os::unix::fs::symlink("nowhere.png", dir.join("dead-link.png")).unwrap();
    std::os::unix::fs::symlink("self-link.png", dir.join("self-link.png")).unwrap();
    std::os::unix::fs::symlink(".", dir.join("loop")).unwrap();
    std::os::unix::fs::symlink("..", dir.join("folder.png").join("up")).unwrap();
    assert!(Command::new("mkfifo").arg(dir.join("fifo.png")).status().unwrap().success());

    let model = fixtures().join("tiny-a");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_dsocr"))
        .args(["ocr", dir.to_str().unwrap(), "--model", model.to_str().unwrap(), "--mode", "tiny", "--task", "free", "--max-new-tokens", "1", "--format", "json"])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let peak_mib = children_peak_rss_mib();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code 1: some inputs failed\n{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{stderr}"));
    let entries = doc["results"].as_array().unwrap();
    let entry = |name: &str, page: Option<u64>| -> &Value {
        let matching: Vec<&Value> = entries
            .iter()
            .filter(|e| e["input"].as_str().unwrap().ends_with(&format!("/{name}")) && e["page"].as_u64() == page)
            .collect();
        assert_eq!(matching.len(), 1, "{name} page {page:?}: one entry\n{}", serde_json::to_string_pretty(entries).unwrap());
        matching[0]
    };
    let ok = |name: &str, page: Option<u64>, size: [u32; 2]| {
        let e = entry(name, page);
        assert!(e["error"].is_null(), "{name}: {}", e["error"]);
        assert_eq!(e["image_size"], serde_json::json!(size), "{name}");
        assert_eq!(e["token_ids"].as_array().unwrap().len(), 1, "{name}");
    };
    let fails = |name: &str, page: Option<u64>, says: &str| {
        let e = entry(name, page);
        let error = e["error"].as_str().unwrap_or_else(|| panic!("{name}: an error, got {e}"));
        assert!(error.contains(says), "{name}: {error:?} should say {says:?}");
    };
    for (name, size) in [
        ("cmyk.jpg", [64, 48]), ("progressive.jpg", [64, 48]), ("exif6-odd.jpg", [23, 37]), ("exif8-odd.jpg", [23, 37]),
        ("exif3-odd.jpg", [37, 23]), ("grey16.png", [40, 30]), ("palette.png", [40, 30]), ("grey-alpha.png", [40, 30]),
        ("animated.gif", [32, 24]), ("lossy.webp", [48, 32]), ("lossless.webp", [48, 32]), ("strip-1x2000.png", [1, 2000]),
        ("strip-2000x1.png", [2000, 1]), ("bomb-64mpx.png", [8000, 8000]), ("png-named.jpg", [1190, 1684]), ("folder.png/inside.png", [1190, 1684]),
    ] {
        ok(name, None, size);
    }
    ok("two-pages.pdf", Some(1), [1190, 1684]);
    ok("two-pages.pdf", Some(2), [300, 200]);
    fails("bomb-header.png", None, "more than the limit of 100000000 pixels");
    fails("bomb-144mpx.png", None, "more than the limit of 100000000 pixels");
    fails("empty.png", None, "empty input");
    fails("random.jpg", None, "unsupported image");
    fails("saved-page.html.png", None, "unsupported image");
    fails("truncated.png", None, "cannot decode image");
    fails("huge.png", None, "more than the limit of 512 MiB (--max-file-mib)");
    fails("dead-link.png", None, "No such file");
    fails("self-link.png", None, "symbolic links");
    fails("fifo.png", None, "not a regular file");
    fails("no-pages.pdf", None, "the PDF has no pages");
    fails("encrypted.pdf", None, "the PDF is encrypted: it needs a password");
    fails("corrupt.pdf", None, "not a readable PDF");
    fails("huge-page.pdf", Some(1), "28800×28800 pixels at 144 dpi, more than the limit");
    // Nothing else: the symlink loops (`loop` → `.`, `folder.png/up` → `..`) walked once.
    assert_eq!(entries.len(), 32, "{}", serde_json::to_string_pretty(entries).unwrap());
    eprintln!("battery: {} entries in {:.1} s, peak RSS {peak_mib} MiB", entries.len(), elapsed.as_secs_f64());
    assert!(elapsed < Duration::from_secs(180), "bounded time: {elapsed:?}");
    assert!(peak_mib < 2048, "bounded memory: {peak_mib} MiB");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The page and file ceilings of `dsocr ocr`: each exceeded is that input's error, nothing allocated.
#[test]
fn cli_ceilings_refuse_what_exceeds_them() {
    let model = fixtures().join("tiny-a");
    let pdf = fixtures().join("images/doc.pdf");
    let page = fixtures().join("images/page.png");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dsocr"))
            .args(["ocr", pdf.to_str().unwrap(), page.to_str().unwrap(), "--model", model.to_str().unwrap(), "--mode", "tiny", "--max-new-tokens", "1", "--format", "json"])
            .args(extra)
            .output()
            .unwrap();
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), doc["results"].as_array().unwrap().clone())
    };
    let (code, results) = run(&["--max-pdf-pages", "1"]);
    assert_eq!(code, Some(1));
    assert!(results[0]["error"].as_str().unwrap().contains("the PDF has 2 pages, more than the limit of 1 (--max-pdf-pages)"), "{}", results[0]);
    assert!(results[1]["error"].is_null(), "the next input goes on");
    let (code, results) = run(&["--max-pixels", "300000"]);
    assert_eq!(code, Some(1));
    // doc.pdf page 1 (1190 × 1684) is over, page 2 (300 × 200) under; page.png 1190 × 1684 is over.
    assert!(results[0]["error"].as_str().unwrap().contains("more than the limit of 300000 pixels"), "{}", results[0]);
    assert!(results[1]["error"].is_null());
    assert!(results[2]["error"].as_str().unwrap().contains("1190×1684, more than the limit of 300000 pixels"), "{}", results[2]);
    // A 2.2 MB PNG (trailing bytes after its end are ignored by decoders) over --max-file-mib 1.
    let padded = std::env::temp_dir().join(format!("dsocr-padded-{}.png", std::process::id()));
    let mut bytes = std::fs::read(&page).unwrap();
    bytes.resize(bytes.len() + (2 << 20), 0);
    std::fs::write(&padded, &bytes).unwrap();
    let (code, results) = run(&["--max-file-mib", "1", padded.to_str().unwrap()]);
    std::fs::remove_file(&padded).unwrap();
    assert_eq!(code, Some(1));
    assert!(results[..3].iter().all(|r| r["error"].is_null()), "files under the limit go on (doc.pdf's 2 pages, page.png)");
    assert!(results[3]["error"].as_str().unwrap().contains(&format!("the file is {} bytes, more than the limit of 1 MiB", bytes.len())), "{}", results[3]);
    // Out-of-range ceilings are usage errors (exit 2).
    for bad in [["--max-tiles", "13"], ["--max-tiles", "1"], ["--max-pixels", "0"], ["--max-pdf-pages", "0"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_dsocr")).args(["ocr", page.to_str().unwrap(), "--model", model.to_str().unwrap()]).args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

/// Peak resident memory of the largest child this process has waited for, in MiB.
fn children_peak_rss_mib() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr());
        usage.assume_init()
    };
    usage.ru_maxrss as u64 / 1024
}
