//! The small trained reader (`weights/reader/`) on held-out synthetic pages: dsocr generates the
//! official code's greedy tokens on every page (the fixtures `tests/fixtures/reader/reader.json` are
//! what `weights/reader/evaluate.py` recorded with DeepSeek's code), so its character error rate is
//! the official one; quantized at load (q8, q4), the error rate stays within a bound of f32's.
//! Unlike the random-weight checkpoints, these weights read: attention is sharp, logits far apart.

use std::ops::ControlFlow;
use std::path::PathBuf;

use dsocr::generate::{GenerationOptions, RepeatGuard};
use dsocr::quant::{Preset, Recipe};
use dsocr::text::Task;
use dsocr::{Engine, Mode};
use dsocr_tests::fixtures_dir;
use dsocr_tests::quant::load;
use serde::Deserialize;

#[derive(Deserialize)]
struct Report {
    prompt: String,
    mode: String,
    max_new_tokens: usize,
    mean_cer: f64,
    pages: Vec<Page>,
}

#[derive(Deserialize)]
struct Page {
    image: String,
    truth: String,
    official_text: String,
    official_tokens: Vec<u32>,
    cer: f64,
}

fn model_dir() -> PathBuf {
    fixtures_dir().join("../../weights/reader/warm-start")
}

fn report() -> (PathBuf, Report) {
    let dir = fixtures_dir().join("reader");
    let report: Report = serde_json::from_slice(&dsocr_tests::read_fixture(&dir.join("reader.json"))).unwrap();
    assert_eq!(report.prompt, Task::FreeOcr.prompt(), "the fixtures' prompt");
    assert_eq!(report.mode, "tiny", "the fixtures' mode");
    assert!(report.pages.len() >= 8, "{} pages", report.pages.len());
    (dir, report)
}

/// Levenshtein distance over characters / length of the truth (as `train.py`'s `cer`).
fn cer(pred: &str, truth: &str) -> f64 {
    let truth: Vec<char> = truth.chars().collect();
    let mut prev: Vec<usize> = (0..=truth.len()).collect();
    for (i, a) in pred.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &c) in truth.iter().enumerate() {
            cur.push((prev[j + 1] + 1).min(cur[j] + 1).min(prev[j] + usize::from(a != c)));
        }
        prev = cur;
    }
    prev[truth.len()] as f64 / truth.len().max(1) as f64
}

/// Greedy tokens (hf no-repeat rule, as the official `generate`) and text of every page.
fn read_pages(engine: &Engine, dir: &std::path::Path, report: &Report) -> Vec<(Vec<u32>, String)> {
    let generation =
        GenerationOptions { max_new_tokens: report.max_new_tokens, repeat_guard: RepeatGuard::hf(), ..GenerationOptions::default() };
    report
        .pages
        .iter()
        .map(|page| {
            let bytes = dsocr_tests::read_fixture(&dir.join(&page.image));
            let result = pollster::block_on(engine.recognize(&bytes, &Task::FreeOcr, Mode::Tiny, &generation, |_| ControlFlow::Continue(())))
                .unwrap_or_else(|e| panic!("{}: {e}", page.image));
            (result.token_ids, result.text)
        })
        .collect()
}

#[test]
fn reads_held_out_pages_as_the_official_code() {
    let (dir, report) = report();
    let engine = load(&model_dir(), None, 2);
    let mut total = 0.0;
    for (page, (tokens, text)) in report.pages.iter().zip(read_pages(&engine, &dir, &report)) {
        assert_eq!(tokens, page.official_tokens, "{}: dsocr {text:?}, official {:?}", page.image, page.official_text);
        assert_eq!(text, page.official_text, "{}", page.image);
        let c = cer(&text, &page.truth);
        assert!((c - page.cer).abs() < 1e-4, "{}: CER {c} against the recorded {}", page.image, page.cer);
        total += c;
    }
    let mean = total / report.pages.len() as f64;
    println!("f32: mean CER {mean:.4} over {} pages (official {:.4})", report.pages.len(), report.mean_cer);
    assert!((mean - report.mean_cer).abs() < 1e-4);
}

#[test]
fn quantized_reader_keeps_its_accuracy() {
    let (dir, report) = report();
    for (preset, bound) in [(Preset::Q8, 0.02), (Preset::Q4, 0.06)] {
        let engine = load(&model_dir(), Some(Recipe::preset(preset, None).unwrap()), 2);
        let pages = read_pages(&engine, &dir, &report);
        let same = pages.iter().zip(&report.pages).filter(|((t, _), p)| *t == p.official_tokens).count();
        let mean = pages.iter().zip(&report.pages).map(|((_, text), p)| cer(text, &p.truth)).sum::<f64>() / pages.len() as f64;
        println!("{preset:?}: mean CER {mean:.4} (f32 {:.4}), f32 tokens on {same}/{} pages", report.mean_cer, pages.len());
        assert!(mean <= report.mean_cer + bound, "{preset:?}: mean CER {mean:.4} against f32's {:.4} + {bound}", report.mean_cer);
    }
}
