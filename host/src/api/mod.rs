//! The HTTP API: routes, shared state and the layers every request passes
//! (request id, tracing span, body limit, JSON errors). Handlers live in
//! [`keys`], [`vms`] and [`transfers`]; they decode, call the service, encode.

mod error;
mod extract;
mod files;
mod keys;
mod openapi;
mod processes;
mod runtimes;
mod transfers;
mod vms;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{delete, get, post, put};
use axum::{middleware, Json, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::sandbox::Sandboxes;
use crate::store::Store;
use crate::transfer::Transfers;

pub use error::ApiError;

/// Largest request body; commands and names are small.
const BODY_LIMIT: usize = 1024 * 1024;
/// Largest single stdin write (use the WebSocket for a continuous stream);
/// below the agent connection's 16 MiB message cap with room for framing.
const STDIN_LIMIT: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub sandboxes: Arc<Sandboxes>,
    pub transfers: Arc<Transfers>,
}

pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi::serve))
        .route("/api-keys", post(keys::create).get(keys::list))
        .route("/api-keys/{id}", delete(keys::revoke))
        .route("/runtimes", get(runtimes::list))
        .route("/vms", post(vms::create).get(vms::list))
        .route("/vms/{name}", get(vms::get).delete(vms::delete))
        .route("/vms/{name}/run", post(vms::run))
        .route(
            "/vms/{name}/processes",
            post(processes::start).get(processes::list),
        )
        .route("/vms/{name}/processes/ws", get(processes::start_ws))
        .route("/vms/{name}/processes/{pid}", get(processes::get))
        .route("/vms/{name}/processes/{pid}/output", get(processes::output))
        .route("/vms/{name}/processes/{pid}/ws", get(processes::attach_ws))
        .route(
            "/vms/{name}/processes/{pid}/stdin",
            post(processes::stdin).layer(DefaultBodyLimit::max(STDIN_LIMIT)),
        )
        .route(
            "/vms/{name}/processes/{pid}/signal",
            post(processes::signal),
        )
        .route(
            "/vms/{name}/processes/{pid}/resize",
            post(processes::resize),
        )
        .route(
            "/vms/{name}/files",
            get(files::download)
                .delete(files::remove)
                // Uploads stream to the agent; their size is not limited here.
                .merge(put(files::upload).layer(DefaultBodyLimit::disable())),
        )
        .route("/vms/{name}/files/stat", get(files::stat))
        .route("/vms/{name}/files/list", get(files::list))
        .route("/vms/{name}/files/mkdir", post(files::mkdir))
        .route("/vms/{name}/files/move", post(files::move_path))
        .route(
            "/vms/{name}/snapshots",
            get(vms::list_snapshots).post(vms::create_snapshot),
        )
        .route(
            "/vms/{name}/snapshots/{snapshot}",
            delete(vms::delete_snapshot),
        )
        .route("/vms/{name}/restore", post(vms::restore))
        .route(
            "/vms/{name}/snapshots/{snapshot}/export",
            post(transfers::export),
        )
        .route("/snapshots/import", post(transfers::import))
        .route("/jobs/{id}", get(transfers::get_job))
        .fallback(route_not_found)
        .with_state(state)
        .layer(middleware::from_fn(error::json_errors))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                    request_id = %id,
                    key_id = tracing::field::Empty,
                )
            }),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    status: &'static str,
}

/// Liveness; needs no key.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

async fn route_not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "route_not_found",
        "no such route",
    )
}
