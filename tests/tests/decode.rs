//! Image decoding: every supported format, EXIF orientation, alpha, and typed errors for bad input and
//! decompression bombs (nothing panics, nothing allocates the bomb).

use std::io::Cursor;

use dsocr::Error;
use dsocr::image::{DecodeLimits, decode};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

fn sample() -> RgbImage {
    RgbImage::from_fn(40, 24, |x, y| Rgb([(x * 6) as u8, (y * 10) as u8, 128]))
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn decodes_every_supported_format() {
    let img = DynamicImage::ImageRgb8(sample());
    for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp, ImageFormat::Tiff] {
        let decoded = decode(&encode(&img, format), &DecodeLimits::default()).unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!(decoded.dimensions(), (40, 24), "{format:?}");
        // Lossless formats round-trip exactly; JPEG and GIF (palette) stay close.
        let max_diff = decoded.as_raw().iter().zip(sample().as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        let allowed = match format {
            ImageFormat::Jpeg => 40,
            ImageFormat::Gif => 64,
            _ => 0,
        };
        assert!(max_diff <= allowed, "{format:?}: max pixel difference {max_diff}");
    }
}

#[test]
fn alpha_is_dropped_not_composited() {
    // Pillow's convert("RGB") keeps the stored colour of transparent pixels.
    let rgba = RgbaImage::from_pixel(4, 4, Rgba([200, 10, 20, 0]));
    let decoded = decode(&encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png), &DecodeLimits::default()).unwrap();
    assert!(decoded.pixels().all(|p| p.0 == [200, 10, 20]));
}

#[test]
fn bad_inputs_are_typed_errors() {
    assert!(matches!(decode(b"", &DecodeLimits::default()), Err(Error::ImageFormat(_))));
    assert!(matches!(decode(b"%PDF-1.7 not an image", &DecodeLimits::default()), Err(Error::ImageFormat(_))));
    let png = encode(&DynamicImage::ImageRgb8(sample()), ImageFormat::Png);
    assert!(matches!(decode(&png[..png.len() / 2], &DecodeLimits::default()), Err(Error::ImageDecode(_))));
}

#[test]
fn a_decompression_bomb_is_refused_before_decoding() {
    // A valid PNG header claiming 100 000 × 100 000 pixels (10 gigapixels) with almost no data.
    let mut png = Vec::new();
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    for (kind, data) in [(&b"IDAT"[..], &b"\x78\x9c\x03\x00\x00\x00\x00\x01"[..]), (b"IEND", b"")] {
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    match decode(&png, &DecodeLimits::default()) {
        Err(Error::ImageTooLarge { width: 100_000, height: 100_000, .. }) => {}
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
    // A tighter limit applies to ordinary images too.
    let small = encode(&DynamicImage::ImageRgb8(sample()), ImageFormat::Png);
    let limits = DecodeLimits { max_pixels: 100, ..DecodeLimits::default() };
    assert!(matches!(decode(&small, &limits), Err(Error::ImageTooLarge { .. })));
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
