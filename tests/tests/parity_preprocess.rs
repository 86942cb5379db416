//! Preprocessing parity with the official `infer` (Pillow): our decode + views give the very uint8
//! pixels and tile grids the reference recorded, and normalisation gives its bf16 tensor.

use dsocr::Mode;
use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views, normalize};
use dsocr_tests::{Array, Fixture, Tolerance, assert_close, assert_views_match, fixtures_dir, hashed_cases, preprocess_index, read_fixture};

fn png(path: &std::path::Path) -> image::RgbImage {
    image::load_from_memory(&read_fixture(path)).unwrap().to_rgb8()
}

#[test]
fn parity_preprocess_views_are_pixel_identical() {
    let index = preprocess_index();
    assert!(index.len() >= 15);
    for (key, case) in index {
        let source = decode(&read_fixture(&fixtures_dir().join("images").join(format!("{}.png", case.image))), &DecodeLimits::default()).unwrap();
        let mode: Mode = case.mode.parse().unwrap();
        let views = make_views(&source, mode, &PreprocessOptions::default()).unwrap();
        assert_eq!(views.grid, case.grid, "{key}: tile grid");
        assert_eq!(views.original_size, case.original_size.map(|v| v as u32), "{key}");
        let ours: Vec<&image::RgbImage> = std::iter::once(&views.global).chain(&views.tiles).collect();
        assert_eq!(ours.len(), case.views.len(), "{key}: number of views");
        let dir = fixtures_dir().join("preprocess").join(&case.image).join(&case.mode);
        for (view, name) in ours.iter().zip(&case.views) {
            let reference = png(&dir.join(format!("{name}.png")));
            assert_eq!(view.dimensions(), reference.dimensions(), "{key} {name}");
            if let Some((i, (a, b))) = view.as_raw().iter().zip(reference.as_raw()).enumerate().find(|(_, (a, b))| a != b) {
                let (px, ch) = (i / 3, i % 3);
                let w = view.width() as usize;
                panic!("{key} {name}: pixel ({}, {}) channel {ch} is {a}, reference {b}", px % w, px / w);
            }
        }
    }
}

#[test]
fn parity_preprocess_normalisation_matches_the_bf16_tensor() {
    let dir = fixtures_dir().join("preprocess/page/tiny");
    let view = png(&dir.join("global.png"));
    let (values, shape) = normalize(&[&view], true);
    let ours = Array::new(shape[1..].to_vec(), values);
    let reference = Fixture::open(dir.join("global.pixels.safetensors")).f32("pixels");
    assert_close("page/tiny", &ours, &reference, Tolerance::Elementwise { abs: 0.0, rel: 0.0 });
}

/// Thirteen more inputs (screenshot, very wide/tall, 1-D-ish strip, thumbnail, tie cases, 3×3 grid,
/// greyscale, RGBA with transparency, palette, EXIF-rotated) in every mode: our views hash to the
/// reference's uint8 pixels.
#[test]
fn parity_preprocess_extra_images_every_mode() {
    let cases = hashed_cases(&fixtures_dir().join("preprocess/extra.json"));
    assert!(cases.len() >= 13 * 5);
    for (key, case) in cases {
        let bytes = read_fixture(&fixtures_dir().join("images/extra").join(format!("{}.png", case.image)));
        let source = decode(&bytes, &DecodeLimits::default()).unwrap();
        let mode: Mode = case.mode.parse().unwrap();
        let views = make_views(&source, mode, &PreprocessOptions::default()).unwrap();
        let base = if mode.crop_mode() { mode.base_size() } else { mode.image_size() };
        let tile = if mode.crop_mode() { 640 } else { 0 };
        assert_eq!(dsocr::model::layout::image_token_count(base, tile, views.grid), case.image_tokens, "{key}");
        assert_views_match(&key, &views, &case);
    }
}
