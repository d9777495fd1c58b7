//! The one place where errors of every layer become HTTP: a status, a stable
//! code and a message, always as `{"error": {"code": ..., "message": ...}}`.

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tracing::error;
use utoipa::ToSchema;

use crate::agent::AgentError;
use crate::auth::AuthError;
use crate::sandbox::SandboxError;
use crate::store::StoreError;
use crate::transfer::TransferError;

/// Error body of every failed call.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `vm_not_found`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// A failure the client cannot fix; the detail goes to the log only.
    fn internal(detail: &dyn std::fmt::Display) -> Self {
        error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the host's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<SandboxError> for ApiError {
    fn from(err: SandboxError) -> Self {
        use SandboxError as E;
        let message = err.to_string();
        let (status, code) = match &err {
            E::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            E::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::VmNotFound(_) => (StatusCode::NOT_FOUND, "vm_not_found"),
            E::SnapshotNotFound(_) => (StatusCode::NOT_FOUND, "snapshot_not_found"),
            E::VmExists(_) => (StatusCode::CONFLICT, "vm_exists"),
            E::SnapshotExists(_) => (StatusCode::CONFLICT, "snapshot_exists"),
            E::SnapshotBusy(_) => (StatusCode::CONFLICT, "snapshot_busy"),
            E::NotRunning { .. } => (StatusCode::CONFLICT, "vm_not_running"),
            E::CommandNotStarted(_) => (StatusCode::BAD_REQUEST, "command_not_started"),
            E::RejectedByPolicy { .. } => (StatusCode::FORBIDDEN, "rejected_by_policy"),
            E::DeniedByHook { .. } => (StatusCode::FORBIDDEN, "denied_by_hook"),
            E::RuntimeUnavailable { .. } => (StatusCode::BAD_REQUEST, "runtime_unavailable"),
            E::ImageUnavailable { .. } => (StatusCode::BAD_REQUEST, "image_unavailable"),
            E::Runtime(_) => {
                error!(error = %err, "runtime error");
                (StatusCode::BAD_GATEWAY, "runtime_error")
            }
            E::NoAgent(_) => (StatusCode::CONFLICT, "agent_absent"),
            E::Agent(AgentError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "agent_unavailable")
            }
            E::Agent(_) => {
                error!(error = %err, "agent error");
                (StatusCode::BAD_GATEWAY, "agent_error")
            }
            E::AgentBusy(_) => (StatusCode::TOO_MANY_REQUESTS, "agent_busy"),
            E::ProcessNotFound(_) => (StatusCode::NOT_FOUND, "process_not_found"),
            E::ProcessState(_) => (StatusCode::CONFLICT, "process_state"),
            E::PathNotFound(_) => (StatusCode::NOT_FOUND, "path_not_found"),
            E::PathExists(_) => (StatusCode::CONFLICT, "path_exists"),
            E::PathRefused(_) => (StatusCode::FORBIDDEN, "path_refused"),
            E::Storage(_) | E::Store(_) | E::Io(_) | E::Plugin(_) => return Self::internal(&err),
        };
        Self::new(status, code, message)
    }
}

impl From<TransferError> for ApiError {
    fn from(err: TransferError) -> Self {
        use TransferError as E;
        match err {
            E::NotConfigured => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "s3_not_configured",
                err.to_string(),
            ),
            E::JobNotFound(_) => Self::new(StatusCode::NOT_FOUND, "job_not_found", err.to_string()),
            E::InvalidRequest(_) => Self::invalid_request(err.to_string()),
            E::Sandbox(e) => e.into(),
            E::Store(e) => Self::internal(&e),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Missing | AuthError::Invalid => {
                Self::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
            }
            AuthError::NotAdmin => Self::new(StatusCode::FORBIDDEN, "forbidden", err.to_string()),
            AuthError::Store(e) => Self::internal(&e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        Self::internal(&err)
    }
}

/// Safety net for responses that axum or tower produce on their own (unknown
/// route, wrong method, body too large, bad path encoding): any error response
/// that is not JSON yet is rewritten into the standard error body.
pub async fn json_errors(request: Request<Body>, next: Next) -> Response {
    let mut response = next.run(request).await;
    let status = response.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The unread rest of the body is still on the wire: tell keep-alive
        // clients that this connection ends here.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let code = match status {
        StatusCode::NOT_FOUND => "route_not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::BAD_REQUEST => "bad_request",
        _ if status.is_server_error() => "internal",
        _ => "error",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut rewritten = ApiError::new(status, code, message).into_response();
    // Keep headers such as `Allow` on 405.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rewritten
}
