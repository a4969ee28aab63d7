//! The one error type handlers return. It maps to a response with an `MHV-xxx` code, a message
//! and recovery steps. Internal causes are logged where they are handled (the handler that saw
//! the broker or decode error) and never sent; server-side errors (5xx) are also logged here,
//! once, with their code, so every 5xx a client saw has a log line.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mahavishnu::error::{ErrorBody, ErrorCode, FieldError};

/// An error that becomes an HTTP response.
#[derive(Debug)]
pub struct ApiError {
    // Boxed: error paths are rare, and a small `Result` keeps the happy path cheap.
    body: Box<ErrorBody>,
    status: StatusCode,
    retry_after_secs: Option<u32>,
}

impl ApiError {
    /// An error with a code and a message for the client.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(code.info().http_status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after_secs = code.is_transient().then_some(1);
        Self {
            body: Box::new(ErrorBody::new(code, message)),
            status,
            retry_after_secs,
        }
    }

    /// Validation failure with field details (422, MHV-003).
    pub fn validation(details: Vec<FieldError>) -> Self {
        let mut e = Self::new(
            ErrorCode::Validation,
            format!("{} field(s) failed validation", details.len()),
        );
        e.body.details = details;
        e
    }

    /// Adds field details.
    pub fn with_details(mut self, details: Vec<FieldError>) -> Self {
        self.body.details = details;
        self
    }

    /// Overrides the HTTP status (e.g. 400 for a malformed header under MHV-003).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Rebuilds an error a worker replied with.
    pub fn from_body(body: ErrorBody) -> Self {
        let code = ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == body.code)
            .unwrap_or(ErrorCode::Internal);
        let mut e = Self::new(code, body.message.clone());
        e.body = Box::new(body);
        e
    }

    /// The code.
    pub fn code(&self) -> &str {
        &self.body.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = %self.body.code, status = self.status.as_u16(), detail = %self.body.message, "answered with a server error");
        }
        let mut resp = (self.status, Json(*self.body)).into_response();
        if let Some(s) = self.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mahavishnu\""),
            );
        }
        resp
    }
}
