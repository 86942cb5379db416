//! What a request can get wrong, as an HTTP status and an OpenAI-style JSON body
//! (`{"error": {"message", "type", "code"}}`), so that OpenAI clients surface the message.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::Error;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable: `image_decode`, `queue_full`, `timeout`, …
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// A request field outside what is accepted: names the field, the rule and the value given.
    pub fn invalid(field: &str, rule: impl std::fmt::Display, given: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_argument", format!("`{field}` {rule}. Given: {given}"))
    }

    pub fn body(&self) -> serde_json::Value {
        let kind = if self.status.is_server_error() { "server_error" } else { "invalid_request_error" };
        serde_json::json!({ "error": { "message": self.message, "type": kind, "code": self.code } })
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let (status, code) = match &error {
            Error::ImageFormat(_) => (StatusCode::BAD_REQUEST, "image_format"),
            Error::ImageDecode(_) => (StatusCode::BAD_REQUEST, "image_decode"),
            Error::ImageTooLarge { .. } => (StatusCode::BAD_REQUEST, "image_too_large"),
            Error::InputTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "input_too_large"),
            Error::InvalidArgument(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_argument"),
            Error::ContextOverflow { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "context_overflow"),
            Error::ImageTokenMismatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "image_token_mismatch"),
            Error::Tokenizer(_) => (StatusCode::UNPROCESSABLE_ENTITY, "tokenizer"),
            Error::Gpu { out_of_memory: true, .. } => (StatusCode::SERVICE_UNAVAILABLE, "out_of_memory"),
            Error::Gpu { .. } => (StatusCode::SERVICE_UNAVAILABLE, "gpu_error"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "backend"),
        };
        Self::new(status, code, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
