//! The image-embedding sequence: per-row newline vectors, local tiles stitched into one grid before
//! the global view, then the view separator (reference: `DeepseekOCRModel.forward`; spec §5.1–5.2).
//! DeepSeek-OCR-2 has no newlines and does not stitch: each tile's query outputs in tile order, then
//! the global view's, then the separator (`DeepseekOCR2Model.forward`).

use burn::tensor::Tensor;

use crate::config::{Geometry, ModelVersion};

/// Tokens per side after SAM's 16-px patches and the 4× compressor: `ceil((size / 16) / 4)`.
pub fn tokens_per_side(view_size: usize) -> usize {
    (view_size / 16).div_ceil(4)
}

/// Number of `<image>` placeholders (= image-sequence vectors) for a global view of side `base_size`
/// and, when `grid = [across, down]` has more than one tile, tiles of side `tile_size`.
pub fn image_token_count(base_size: usize, tile_size: usize, [across, down]: [usize; 2]) -> usize {
    let g = tokens_per_side(base_size);
    let mut count = g * (g + 1) + 1;
    if across > 1 || down > 1 {
        let t = tokens_per_side(tile_size);
        count += (t * across + 1) * (t * down);
    }
    count
}

/// `<image>` placeholders for an image with `grid` tiles cut by a mode's `geometry`, per model version.
pub fn image_tokens(version: ModelVersion, geometry: &Geometry, grid: [usize; 2]) -> usize {
    let tile = geometry.tile.unwrap_or(0);
    match version {
        ModelVersion::Ocr1 => image_token_count(geometry.global, tile, grid),
        ModelVersion::Ocr2 => image_token_count_v2(geometry.global, tile, grid),
    }
}

/// DeepSeek-OCR-2's count: `g² + 1` for the global view plus `t²` per tile when tiled.
pub fn image_token_count_v2(base_size: usize, tile_size: usize, [across, down]: [usize; 2]) -> usize {
    let g = tokens_per_side(base_size);
    let mut count = g * g + 1;
    if across > 1 || down > 1 {
        let t = tokens_per_side(tile_size);
        count += t * t * across * down;
    }
    count
}

/// DeepSeek-OCR-2's sequence for one image: `tiles` `(k, t², D)` flattened in tile order (when
/// tiled), the global view's `(1, g², D)`, then `separator`.
pub fn image_sequence_v2(global: Tensor<3>, tiles: Option<Tensor<3>>, separator: Tensor<1>) -> Tensor<2> {
    let [_, tokens, d] = global.dims();
    let mut parts = Vec::with_capacity(3);
    if let Some(tiles) = tiles {
        let [k, t, _] = tiles.dims();
        parts.push(tiles.reshape([k * t, d]));
    }
    parts.push(global.reshape([tokens, d]));
    parts.push(separator.reshape([1, d]));
    Tensor::cat(parts, 0)
}

/// Appends `newline` after each row of a `(rows, cols, D)` grid and flattens it row-major.
fn with_newlines(grid: Tensor<3>, newline: Tensor<1>) -> Tensor<2> {
    let [rows, cols, d] = grid.dims();
    let column = newline.reshape([1, 1, d]).expand([rows, 1, d]);
    Tensor::cat(vec![grid, column], 1).reshape([rows * (cols + 1), d])
}

/// The sequence for one image.
///
/// * `global`: projected features of the global view, `(1, g², D)`;
/// * `local`: projected features of the tiles in row-major tile order, `(across·down, t², D)`, with the
///   grid `[across, down]`; `None` when the image is not tiled.
pub fn image_sequence(
    global: Tensor<3>,
    local: Option<(Tensor<3>, [usize; 2])>,
    newline: Tensor<1>,
    separator: Tensor<1>,
) -> Tensor<2> {
    let [_, tokens, d] = global.dims();
    let g = side(tokens);
    let mut parts = Vec::with_capacity(3);
    if let Some((tiles, [across, down])) = local {
        let [n, tile_tokens, _] = tiles.dims();
        assert_eq!(n, across * down, "tile features do not match the grid");
        let t = side(tile_tokens);
        // (down, across, t, t, D) → (down, t, across, t, D): the tiles stitched into one big grid.
        let stitched = tiles
            .reshape([down, across, t, t, d])
            .permute([0, 2, 1, 3, 4])
            .reshape([down * t, across * t, d]);
        parts.push(with_newlines(stitched, newline.clone()));
    }
    parts.push(with_newlines(global.reshape([g, g, d]), newline));
    parts.push(separator.reshape([1, d]));
    Tensor::cat(parts, 0)
}

fn side(tokens: usize) -> usize {
    let s = (tokens as f64).sqrt().round() as usize;
    assert_eq!(s * s, tokens, "view features must form a square grid");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_spec() {
        assert_eq!(image_token_count(512, 0, [1, 1]), 73);
        assert_eq!(image_token_count(640, 0, [1, 1]), 111);
        assert_eq!(image_token_count(1024, 640, [1, 1]), 273);
        assert_eq!(image_token_count(1280, 0, [1, 1]), 421);
        for (grid, n) in [([2, 3], 903), ([3, 2], 893), ([2, 2], 693), ([3, 1], 583), ([4, 1], 683), ([1, 4], 713), ([3, 3], 1203)] {
            assert_eq!(image_token_count(1024, 640, grid), n, "{grid:?}");
        }
        // DeepSeek-OCR-2: 256 + 1, plus 144 per 768 tile.
        assert_eq!(image_token_count_v2(1024, 768, [1, 1]), 257);
        assert_eq!(image_token_count_v2(1024, 768, [2, 3]), 257 + 6 * 144);
        assert_eq!(image_token_count_v2(1024, 768, [2, 1]), 545);
    }
}
