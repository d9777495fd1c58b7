//! The OpenAPI document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{error, files, keys, processes, runtimes, transfers, vms};

#[derive(OpenApi)]
#[openapi(
    info(title = "OpenSandbox", description = "Isolated sandboxes with instant Btrfs snapshots"),
    paths(
        super::health,
        keys::create, keys::list, keys::revoke,
        runtimes::list,
        vms::create, vms::list, vms::get, vms::delete, vms::run,
        vms::list_snapshots, vms::create_snapshot, vms::delete_snapshot, vms::restore,
        processes::start, processes::list, processes::get, processes::output,
        processes::attach_ws, processes::start_ws, processes::stdin, processes::signal,
        processes::resize,
        files::download, files::upload, files::stat, files::list, files::mkdir,
        files::move_path, files::remove,
        transfers::export, transfers::import, transfers::get_job,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail, processes::EventView)),
    modifiers(&ApiKeyHeader)
)]
pub struct ApiDoc;

struct ApiKeyHeader;

impl Modify for ApiKeyHeader {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
