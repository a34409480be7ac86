//! The JSON error answer every route gives, and how each module's errors map to a status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::AuthError;
use crate::log::LogError;
use crate::plugins::PluginError;

/// An error answer: status plus a JSON body naming the problem.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, body: json!({ "error": message.into() }) }
    }
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(super) fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body[key] = value.into();
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was not read: the connection cannot carry another request.
            let close = [(axum::http::header::CONNECTION, "close")];
            return (self.status, close, axum::Json(self.body)).into_response();
        }
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// A request body that could not be read (over its size limit: 413), as a JSON error.
pub(super) fn unreadable_body(rejection: axum::extract::rejection::BytesRejection, field: &str) -> ApiError {
    ApiError::new(rejection.status(), format!("the body: {}", rejection.body_text())).with("field", field.to_owned())
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::NoSuchTopic(_) | LogError::NoSuchPartition { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string())
            }
            LogError::Storage(_) | LogError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            LogError::Refused { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        }
    }
}

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        let status = match e {
            _ if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            PluginError::NotFound(_) => StatusCode::NOT_FOUND,
            PluginError::NotRunning(_) | PluginError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            PluginError::NoAnswer { .. } => StatusCode::GATEWAY_TIMEOUT,
            PluginError::Failed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            PluginError::NoShadow(_) | PluginError::ShadowBehind { .. } => StatusCode::CONFLICT,
            PluginError::BadManifest(_) => return ApiError::bad_request(e.to_string()).with("field", "manifest"),
            PluginError::BadName(_)
            | PluginError::BadComponent(_)
            | PluginError::NotStarted(_)
            | PluginError::StartFailed { .. } => {
                return ApiError::bad_request(e.to_string()).with("field", "wasm");
            }
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = match e {
            AuthError::Missing | AuthError::Invalid(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) | AuthError::Room(_) => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, e.to_string())
    }
}
