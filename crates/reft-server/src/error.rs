//! Errors as OpenAI sends them: a status and `{"error": {"message", "type", "param", "code"}}`,
//! so that clients written for OpenAI or vLLM show the message instead of failing to parse.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use reft::engine::Refusal;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The request field at fault, where there is one.
    pub param: Option<String>,
    /// A short machine-readable code (`model_not_found`, `queue_full`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 400 about one field.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// Any status with a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// The same error with a code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The error's `type`, as OpenAI names the kinds.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The queue moves at decode speed: a second is a fair first wait.
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<reft::Error> for ApiError {
    fn from(e: reft::Error) -> Self {
        match &e {
            reft::Error::Refused(r) => match r {
                Refusal::UnknownAdapter(_) => {
                    Self::new(StatusCode::NOT_FOUND, e.to_string()).with_code("model_not_found")
                }
                Refusal::PromptTooLong { .. } => {
                    Self::bad_field("messages", e.to_string()).with_code("context_length_exceeded")
                }
                Refusal::QueueFull(_) => {
                    Self::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).with_code("queue_full")
                }
                Refusal::Stopped => Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            },
            reft::Error::InvalidArgument(_) => Self::bad_request(e.to_string()),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}
