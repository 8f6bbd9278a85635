//! The one error shape every kvgate HTTP surface answers with (the gateway, the
//! index API, the simulated engine, the bench's fake backend): OpenAI's
//!
//! ```json
//! {"error": {"message": "...", "type": "BadRequestError", "param": "model", "code": 400}}
//! ```
//!
//! # The `type` convention
//!
//! `type` follows from the HTTP status alone, in one place ([`error_type`]), and
//! uses the names vLLM's `ErrorResponse` uses (`create_error_response` in
//! vLLM's OpenAI server: "BadRequestError", "NotFoundError",
//! "UnprocessableEntityError", "InternalServerError", "NotImplementedError"),
//! which are the exception class names of the `openai` Python client. vLLM is the
//! engine behind the gateway, so a client sees the same errors through kvgate
//! as from vLLM directly. Statuses vLLM does not produce get names of the same
//! form:
//!
//! | status | `type` |
//! |---|---|
//! | 400 | `BadRequestError` |
//! | 401 | `AuthenticationError` |
//! | 403 | `PermissionDeniedError` |
//! | 404 | `NotFoundError` |
//! | 409 | `ConflictError` |
//! | 413 | `PayloadTooLargeError` |
//! | 415 | `UnsupportedMediaTypeError` |
//! | 422 | `UnprocessableEntityError` |
//! | 429 | `RateLimitError` |
//! | 500 | `InternalServerError` |
//! | 501 | `NotImplementedError` |
//! | 502 | `BadGatewayError` |
//! | 503 | `ServiceUnavailableError` |
//! | 504 | `GatewayTimeoutError` |
//! | other 5xx | `InternalServerError` |
//! | any other | `BadRequestError` |
//!
//! `code` is the status as an integer and `param` the request field at fault
//! (or null), as in vLLM. Refusals of the contract layer carry a string code
//! instead, as OpenAI's own API does for its (`invalid_api_key`,
//! `rate_limit_exceeded`): `contract_suspended`, `rate_limit_tokens`, ...
//! ([`OpenAiError::with_code`]).

use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::ser::{Serialize, SerializeStruct, Serializer};

/// An error as an OpenAI-compatible server returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u32>,
    /// A string `code` in place of the status.
    code: Option<&'static str>,
}

/// The `type` of an error with this status (see the crate docs for the table).
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        409 => "ConflictError",
        413 => "PayloadTooLargeError",
        415 => "UnsupportedMediaTypeError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        501 => "NotImplementedError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        s if (500..600).contains(&s) => "InternalServerError",
        _ => "BadRequestError",
    }
}

impl OpenAiError {
    /// An error with any status; its `type` follows from the status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
            code: None,
        }
    }

    /// 400, naming the request field at fault when there is one.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message).with_param(param)
    }

    /// 404 (vLLM names `model` for an unknown model).
    pub fn not_found(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message).with_param(param)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 413.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 502: the upstream failed.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, message)
    }

    /// 503, with a `Retry-After` header when `retry_after_secs` is given.
    pub fn service_unavailable(message: impl Into<String>, retry_after_secs: Option<u32>) -> Self {
        Self {
            retry_after: retry_after_secs,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    /// The same error naming `param` as the field at fault.
    /// A stable string `code` saying why (the contract layer's refusals).
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_param(mut self, param: Option<&'static str>) -> Self {
        self.param = param;
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `type` field ([`error_type`] of the status).
    pub fn error_type(&self) -> &'static str {
        error_type(self.status)
    }

    pub fn param(&self) -> Option<&'static str> {
        self.param
    }

    /// The `Retry-After` seconds the response carries, if any.
    pub fn retry_after(&self) -> Option<u32> {
        self.retry_after
    }

    /// An extractor's rejection: its status kept (413 for an oversized body, 415),
    /// except 422, which vLLM answers as 400 (FastAPI's validation errors).
    fn rejection(status: StatusCode, text: String) -> Self {
        let status = match status {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        Self::new(status, text)
    }
}

/// Serializes as the whole body, `{"error": {...}}` (also what an SSE error event carries).
impl Serialize for OpenAiError {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Inner<'a>(&'a OpenAiError);
        impl Serialize for Inner<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut s = serializer.serialize_struct("ErrorInfo", 4)?;
                s.serialize_field("message", &self.0.message)?;
                s.serialize_field("type", self.0.error_type())?;
                s.serialize_field("param", &self.0.param)?;
                match self.0.code {
                    Some(code) => s.serialize_field("code", code)?,
                    None => s.serialize_field("code", &self.0.status.as_u16())?,
                }
                s.end()
            }
        }
        let mut s = serializer.serialize_struct("ErrorResponse", 1)?;
        s.serialize_field("error", &Inner(self))?;
        s.end()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(&self)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<JsonRejection> for OpenAiError {
    fn from(e: JsonRejection) -> Self {
        Self::rejection(e.status(), e.body_text())
    }
}

impl From<BytesRejection> for OpenAiError {
    fn from(e: BytesRejection) -> Self {
        Self::rejection(e.status(), e.body_text())
    }
}

impl From<QueryRejection> for OpenAiError {
    fn from(e: QueryRejection) -> Self {
        Self::rejection(e.status(), e.body_text())
    }
}

#[cfg(test)]
mod tests;

/// A listener for an HTTP surface that streams (SSE): every accepted socket
/// gets `TCP_NODELAY`. Otherwise a response's first chunk, written after its
/// headers, waits for the client's delayed ACK (~40 ms on Linux) under
/// Nagle's algorithm, and time to first token with it.
pub fn streaming_listener(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    listener.tap_io(set_nodelay as fn(&mut tokio::net::TcpStream))
}

fn set_nodelay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(error = %e, "TCP_NODELAY not set on an accepted connection");
    }
}
