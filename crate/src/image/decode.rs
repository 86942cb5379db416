//! Image bytes → 8-bit RGB, as the reference loads them (`Image.open`, `ImageOps.exif_transpose`,
//! `.convert("RGB")`; spec §2.2), with limits so a decompression bomb is an error, not an OOM.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// Bounds on what a decoder may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted encoded input, in bytes (checked before anything is parsed).
    pub max_bytes: u64,
    /// Largest accepted width × height (after reading the header, before decoding pixels).
    pub max_pixels: u64,
    /// Largest single allocation a decoder may make, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    /// 512 MiB of encoded bytes, 100 megapixels (an A3 scan at 600 dpi is 70 MP), 2 GiB of decoder memory.
    fn default() -> Self {
        Self { max_bytes: 512 << 20, max_pixels: 100_000_000, max_alloc: 2 << 30 }
    }
}

/// Decodes PNG, JPEG, WebP, GIF (first frame), BMP or TIFF bytes; applies the EXIF orientation; converts
/// to RGB the way Pillow's `convert("RGB")` does (alpha is dropped, not composited; grey is replicated).
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::ImageFormat("empty input".into()));
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(Error::InputTooLarge { bytes: bytes.len() as u64, max_bytes: limits.max_bytes });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::ImageDecode(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(Error::ImageFormat("not a PNG, JPEG, WebP, GIF, BMP or TIFF image".into()));
    };
    let mut reader = reader;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc);
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(|e| classify(e, format))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::ImageDecode(format!("{format:?} image has size {w}×{h}")));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(Error::ImageTooLarge { width: w, height: h, max_pixels: limits.max_pixels });
    }
    // A missing or unreadable EXIF block means "no rotation", as in Pillow.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| classify(e, format))?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

fn classify(e: image::ImageError, format: image::ImageFormat) -> Error {
    match e {
        image::ImageError::Limits(l) => Error::ImageDecode(format!("{format:?} image exceeds the decoder memory limit: {l}")),
        image::ImageError::Unsupported(u) => Error::ImageFormat(format!("{format:?}: {u}")),
        other => Error::ImageDecode(format!("{format:?}: {other}")),
    }
}
