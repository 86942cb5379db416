//! What `recognize` accepts: encoded image bytes (Uint8Array, ArrayBuffer, Blob/File) or decoded
//! pixels (ImageData, ImageBitmap). The npm package turns every other kind (elements, canvases,
//! video frames, URLs) into one of these before it crosses into the worker.

use js_sys::Uint8Array;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use super::error::js_error;
use super::get;

pub(crate) enum Input {
    Pixels(image::RgbImage),
    Encoded(Vec<u8>),
}

pub(crate) async fn read(input: &JsValue) -> Result<Input, JsValue> {
    if let Some(bitmap) = input.dyn_ref::<web_sys::ImageBitmap>() {
        return Ok(Input::Pixels(image_data(&bitmap_pixels(bitmap)?)?.expect("ImageData from a canvas")));
    }
    if let Some(image) = image_data(input)? {
        return Ok(Input::Pixels(image));
    }
    Ok(Input::Encoded(input_bytes(input).await?))
}

/// `ImageData` → RGB (alpha dropped, as the reference's `convert("RGB")`).
fn image_data(input: &JsValue) -> Result<Option<image::RgbImage>, JsValue> {
    let Some(data) = get(input, "data").filter(|d| d.is_instance_of::<js_sys::Uint8ClampedArray>()) else { return Ok(None) };
    let width = get(input, "width").and_then(|v| v.as_f64()).unwrap_or(0.0) as u32;
    let height = get(input, "height").and_then(|v| v.as_f64()).unwrap_or(0.0) as u32;
    let rgba = js_sys::Uint8ClampedArray::from(data).to_vec();
    if width == 0 || height == 0 || rgba.len() as u64 != u64::from(width) * u64::from(height) * 4 {
        return Err(js_error("BAD_IMAGE", "ImageData with inconsistent size"));
    }
    let rgb: Vec<u8> = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    Ok(image::RgbImage::from_raw(width, height, rgb))
}

/// An `ImageBitmap`'s pixels as `ImageData`, drawn on an `OffscreenCanvas` (works in workers too).
fn bitmap_pixels(bitmap: &web_sys::ImageBitmap) -> Result<JsValue, JsValue> {
    let (width, height) = (bitmap.width(), bitmap.height());
    if width == 0 || height == 0 {
        return Err(js_error("BAD_IMAGE", "empty ImageBitmap (closed or zero-sized)"));
    }
    let canvas = web_sys::OffscreenCanvas::new(width, height)?;
    let context: web_sys::OffscreenCanvasRenderingContext2d =
        canvas.get_context("2d")?.ok_or_else(|| js_error("INTERNAL", "no 2d context for an OffscreenCanvas"))?.dyn_into()?;
    context.draw_image_with_image_bitmap(bitmap, 0.0, 0.0)?;
    Ok(context.get_image_data(0.0, 0.0, width as f64, height as f64)?.into())
}

/// Encoded image bytes from a Uint8Array, ArrayBuffer or Blob/File.
async fn input_bytes(input: &JsValue) -> Result<Vec<u8>, JsValue> {
    if let Some(array) = input.dyn_ref::<Uint8Array>() {
        return Ok(array.to_vec());
    }
    if input.is_instance_of::<js_sys::ArrayBuffer>() {
        return Ok(Uint8Array::new(input).to_vec());
    }
    if let Some(blob) = input.dyn_ref::<web_sys::Blob>() {
        let buffer = JsFuture::from(blob.array_buffer()).await?;
        return Ok(Uint8Array::new(&buffer).to_vec());
    }
    Err(js_error("BAD_ARGUMENT", "input must be a Uint8Array, ArrayBuffer, Blob/File, ImageData or ImageBitmap"))
}
