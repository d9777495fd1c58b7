//! `GET /runtimes`: the runtimes this host offers (Docker and the runtime
//! plugins), whether each answers its health check now, and why not.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::extract::Caller;
use super::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct RuntimeView {
    /// The name to pass as `runtime` when creating a sandbox.
    pub name: String,
    /// Whether sandboxes go here when neither the client nor a policy chooses.
    pub default: bool,
    pub healthy: bool,
    /// Why the runtime is not healthy (the runtime's own words).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuntimeList {
    pub runtimes: Vec<RuntimeView>,
}

/// Lists the runtimes with their health. Any key.
#[utoipa::path(get, path = "/runtimes", responses(
    (status = 200, body = RuntimeList), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Json<RuntimeList> {
    let runtimes = state.sandboxes.runtimes();
    let default = runtimes.default_runtime().name().to_string();
    let mut views = Vec::new();
    for runtime in runtimes.iter() {
        let health = runtime.health().await;
        views.push(RuntimeView {
            name: runtime.name().to_string(),
            default: runtime.name() == default,
            healthy: health.is_ok(),
            error: health.err(),
        });
    }
    Json(RuntimeList { runtimes: views })
}
