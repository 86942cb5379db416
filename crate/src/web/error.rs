//! Errors as the browser sees them: JS `Error`s with a stable `code` to branch on (the npm package
//! turns them into `DsocrError`s; see `www/src/errors.ts` for the full list).

use wasm_bindgen::{JsCast, JsValue};

use crate::error::Error;

/// A JS `Error` with `code` and the message.
pub(crate) fn js_error(code: &str, message: impl std::fmt::Display) -> JsValue {
    let error = js_sys::Error::new(&message.to_string());
    let _ = js_sys::Reflect::set(&error, &"code".into(), &code.into());
    error.into()
}

pub(crate) fn code_of(e: &Error) -> &'static str {
    match e {
        Error::Config(_) | Error::Unsupported(_) | Error::Tokenizer(_) => "BAD_CHECKPOINT",
        Error::Safetensors(_) | Error::MissingTensor { .. } | Error::ShapeMismatch { .. } | Error::UnsupportedDtype { .. } => {
            "BAD_CHECKPOINT"
        }
        Error::Shard { .. } => "BAD_CHECKPOINT",
        Error::InFile { source, .. } => code_of(source),
        Error::ImageFormat(_) | Error::ImageDecode(_) | Error::ImageTooLarge { .. } | Error::InputTooLarge { .. } => "BAD_IMAGE",
        Error::InvalidArgument(_) | Error::ContextOverflow { .. } => "BAD_ARGUMENT",
        Error::ImageTokenMismatch { .. } | Error::TokenOutOfRange { .. } => "INTERNAL",
        Error::Io(_) | Error::Download(_) => "NETWORK",
        Error::Backend(_) => "INTERNAL",
        Error::Gpu { out_of_memory: true, .. } => "OUT_OF_MEMORY",
        Error::Gpu { .. } => "INTERNAL",
    }
}

pub(crate) fn from_error(e: Error) -> JsValue {
    // A fetch aborted through the caller's signal surfaces as a download error; keep it an abort.
    if let Error::Download(message) = &e {
        if message.contains(ABORT_MARK) {
            return js_error("ABORTED", "aborted");
        }
    }
    js_error(code_of(&e), e)
}

/// What [`message_of`] writes for an `AbortError`, so that an abort survives the crate's own
/// error type on its way out (see [`from_error`]).
pub(crate) const ABORT_MARK: &str = "[aborted]";

/// A JS exception's message (`AbortError`s marked with [`ABORT_MARK`]).
pub(crate) fn message_of(e: &JsValue) -> String {
    if is_abort(e) {
        return ABORT_MARK.into();
    }
    e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).or_else(|| e.as_string()).unwrap_or_else(|| format!("{e:?}"))
}

/// A `DOMException` named `AbortError` (what an aborted `fetch` rejects with), or our own `ABORTED`.
pub(crate) fn is_abort(e: &JsValue) -> bool {
    let field = |key: &str| js_sys::Reflect::get(e, &key.into()).ok().and_then(|v| v.as_string());
    field("name").as_deref() == Some("AbortError") || field("code").as_deref() == Some("ABORTED")
}
