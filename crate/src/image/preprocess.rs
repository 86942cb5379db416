//! RGB image → the views a mode feeds the encoder, exactly as the reference's `infer` makes them
//! (spec §2): squash-resize (Tiny/Small), fit + centre-pad with grey 127 (Base/Large/Gundam global view),
//! Gundam tiles cut from a squash-resize to the chosen grid; then `(x/255 − 0.5)/0.5`. DeepSeek-OCR-2
//! does the same with 768-pixel tiles and at most 6 of them ([`Geometry`]).

use image::RgbImage;

use super::resample::resize_rgb8;
use crate::config::{Geometry, ModelVersion, Mode};
use crate::error::{Error, Result};

/// The pad colour: `int(0.5 · 255)` per channel.
pub const PAD_GREY: [u8; 3] = [127, 127, 127];
/// DeepSeek-OCR's Gundam tile side (hard-wired in the reference's `dynamic_preprocess`).
pub const TILE_SIZE: usize = 640;

#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessOptions {
    /// Bounds on the number of Gundam tiles (`min_num`, `max_num`). `max_tiles` `None` is the
    /// model's own: DeepSeek-OCR's model card 9 (its vLLM config uses 6), DeepSeek-OCR-2's 6.
    /// Supported maxima: 2..=12.
    pub min_tiles: usize,
    pub max_tiles: Option<usize>,
    /// Round normalised pixels to bf16 as the official `infer` does (`.to(torch.bfloat16)`).
    pub round_to_bf16: bool,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        Self { min_tiles: 2, max_tiles: None, round_to_bf16: true }
    }
}

/// The views of one image.
#[derive(Debug, Clone)]
pub struct Views {
    /// The global view, `base_size`² (Gundam) or `image_size`² (native modes).
    pub global: RgbImage,
    /// Gundam tiles in row-major order (empty when not tiled).
    pub tiles: Vec<RgbImage>,
    /// Tiles across and down; `[1, 1]` when not tiled.
    pub grid: [usize; 2],
    /// Width and height of the input image (after EXIF orientation): boxes map back to it.
    pub original_size: [u32; 2],
}

/// Builds the views of `image` for `mode` as DeepSeek-OCR makes them.
pub fn make_views(image: &RgbImage, mode: Mode, options: &PreprocessOptions) -> Result<Views> {
    make_views_for(image, &mode.geometry(ModelVersion::Ocr1)?, options)
}

/// Builds the views of `image` for a mode's [`Geometry`] (see [`Mode::geometry`]).
pub fn make_views_for(image: &RgbImage, geometry: &Geometry, options: &PreprocessOptions) -> Result<Views> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::ImageDecode(format!("image has size {w}×{h}")));
    }
    let original_size = [w, h];
    let s = geometry.global as u32;
    let Some(tile) = geometry.tile else {
        // `infer`: small views are squash-resized; larger ones are fit + padded.
        let global = if geometry.squash { resize(image, s, s) } else { pad_to_square(image, s, PAD_GREY) };
        return Ok(Views { global, tiles: Vec::new(), grid: [1, 1], original_size });
    };
    let (tiles, grid) = if w as usize <= tile && h as usize <= tile {
        (Vec::new(), [1, 1])
    } else {
        let max_tiles = options.max_tiles.unwrap_or(geometry.default_max_tiles);
        let grid = tile_grid(w as usize, h as usize, tile, options.min_tiles, max_tiles)?;
        (cut_tiles(image, tile, grid), grid)
    };
    let global = pad_to_square(image, s, PAD_GREY);
    Ok(Views { global, tiles, grid, original_size })
}

/// Pillow `Image.resize((w, h), BICUBIC)`.
pub fn resize(image: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = image.dimensions();
    let data = resize_rgb8(image.as_raw(), [iw as usize, ih as usize], [w as usize, h as usize]);
    RgbImage::from_raw(w, h, data).expect("resize_rgb8 returns w·h·3 bytes")
}

/// `ImageOps.pad(image, (s, s), BICUBIC, color)`: fit inside `s × s` keeping the aspect ratio
/// (Python's round-half-even on the scaled side) and centre on a `color` canvas.
pub fn pad_to_square(image: &RgbImage, s: u32, color: [u8; 3]) -> RgbImage {
    let (w, h) = image.dimensions();
    // `contain`: the long side becomes s; a side that would round to 0 is kept at 1 pixel (the
    // reference fails on such strips).
    let (rw, rh) = if w == h {
        (s, s)
    } else if w > h {
        (s, ((h as f64 / w as f64 * s as f64).round_ties_even() as u32).max(1))
    } else {
        (((w as f64 / h as f64 * s as f64).round_ties_even() as u32).max(1), s)
    };
    let resized = resize(image, rw, rh);
    if (rw, rh) == (s, s) {
        return resized;
    }
    let mut canvas = RgbImage::from_pixel(s, s, image::Rgb(color));
    let (x0, y0) = if rw != s {
        (((s - rw) as f64 * 0.5).round_ties_even() as u32, 0)
    } else {
        (0, ((s - rh) as f64 * 0.5).round_ties_even() as u32)
    };
    image::imageops::replace(&mut canvas, &resized, x0 as i64, y0 as i64);
    canvas
}

/// Candidate grids `(across, down)` with `min ≤ across·down ≤ max`, in the order the reference scans them:
/// CPython's iteration order of the candidate set, then a stable sort by tile count (spec §2.7).
fn candidate_grids(max: usize) -> Result<&'static [(usize, usize)]> {
    const ORDERS: [&[(usize, usize)]; 11] = [
        &[(1, 2), (2, 1)],
        &[(1, 2), (2, 1), (3, 1), (1, 3)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2), (7, 1), (1, 7)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5), (5, 2), (10, 1), (1, 10)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5), (5, 2), (10, 1), (1, 10), (11, 1), (1, 11)],
        &[(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5), (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)],
    ];
    max.checked_sub(2)
        .and_then(|i| ORDERS.get(i).copied())
        .ok_or_else(|| Error::InvalidArgument(format!("max_tiles must be in 2..=12, got {max}")))
}

/// The reference's `find_closest_aspect_ratio`: the grid whose aspect is nearest the image's; exact ties
/// go to the later candidate when the image is large enough for it (`tile`: the tile side).
pub fn tile_grid(w: usize, h: usize, tile: usize, min_tiles: usize, max_tiles: usize) -> Result<[usize; 2]> {
    if min_tiles < 2 || min_tiles > max_tiles {
        return Err(Error::InvalidArgument(format!("tile bounds {min_tiles}..={max_tiles}: need 2 ≤ min ≤ max")));
    }
    let aspect = w as f64 / h as f64;
    let area = (w * h) as f64;
    let tile = tile as f64;
    let mut best = [1, 1];
    let mut best_diff = f64::INFINITY;
    for &(i, j) in candidate_grids(max_tiles)?.iter().filter(|(i, j)| i * j >= min_tiles) {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = [i, j];
        } else if diff == best_diff && area > 0.5 * tile * tile * (i * j) as f64 {
            best = [i, j];
        }
    }
    Ok(best)
}

/// Squash-resizes to `(tile·across, tile·down)` and cuts the tiles row by row.
fn cut_tiles(image: &RgbImage, tile: usize, [across, down]: [usize; 2]) -> Vec<RgbImage> {
    let t = tile as u32;
    let resized = resize(image, t * across as u32, t * down as u32);
    (0..across * down)
        .map(|k| {
            let (x, y) = ((k % across) as u32 * t, (k / across) as u32 * t);
            image::imageops::crop_imm(&resized, x, y, t, t).to_image()
        })
        .collect()
}

/// Normalised CHW pixels of same-sized views, `(n, 3, S, S)` row-major: `(x/255 − 0.5)/0.5`, optionally
/// rounded to bf16 (round to nearest even) like the reference.
pub fn normalize(views: &[&RgbImage], round_to_bf16: bool) -> (Vec<f32>, [usize; 4]) {
    let (w, h) = views.first().map_or((0, 0), |v| v.dimensions());
    let (w, h) = (w as usize, h as usize);
    let mut out = vec![0.0f32; views.len() * 3 * h * w];
    for (n, view) in views.iter().enumerate() {
        assert_eq!(view.dimensions(), (w as u32, h as u32), "views of one batch share a size");
        for (i, p) in view.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                let v = (p[c] as f32 / 255.0 - 0.5) / 0.5;
                let v = if round_to_bf16 { half::bf16::from_f32(v).to_f32() } else { v };
                out[((n * 3 + c) * h) * w + i] = v;
            }
        }
    }
    (out, [views.len(), 3, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_of_the_spec_examples() {
        let g = |w, h, max| tile_grid(w, h, TILE_SIZE, 2, max).unwrap();
        assert_eq!(g(1190, 1684, 9), [2, 3]);
        assert_eq!(g(800, 600, 9), [3, 2]);
        assert_eq!(g(1250, 1000, 9), [3, 2]); // exact tie with (2,2); the area rule picks (3,2)
        assert_eq!(g(641, 640, 9), [2, 2]);
        assert_eq!(g(1024, 1024, 9), [2, 2]);
        assert_eq!(g(3000, 1000, 9), [3, 1]);
        assert_eq!(g(4000, 1000, 9), [4, 1]);
        assert_eq!(g(700, 2800, 9), [1, 4]);
        assert_eq!(g(1400, 1400, 9), [3, 3]);
        assert_eq!(g(1400, 1400, 6), [2, 2]);
        assert!(tile_grid(100, 100, TILE_SIZE, 2, 13).is_err());
        // DeepSeek-OCR-2's 768 tiles: the area rule's threshold scales with the tile.
        assert_eq!(tile_grid(1250, 1000, 768, 2, 6).unwrap(), [2, 2]);
    }

    #[test]
    fn strips_and_tiny_images_give_defined_views() {
        let strip = RgbImage::from_pixel(1, 5000, image::Rgb([10, 20, 30]));
        for mode in Mode::ALL {
            let v = make_views(&strip, mode, &PreprocessOptions::default()).unwrap();
            let s = if mode.crop_mode() { mode.base_size() } else { mode.image_size() } as u32;
            assert_eq!(v.global.dimensions(), (s, s));
            assert_eq!(v.tiles.len(), v.grid[0] * v.grid[1] * usize::from(v.grid != [1, 1]));
        }
        let dot = RgbImage::from_pixel(1, 1, image::Rgb([200, 0, 0]));
        let v = make_views(&dot, Mode::Gundam, &PreprocessOptions::default()).unwrap();
        assert_eq!((v.grid, v.global.dimensions()), ([1, 1], (1024, 1024)));
    }
}
