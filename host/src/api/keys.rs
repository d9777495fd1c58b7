//! API key endpoints: create (open while no key exists), list, revoke.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{presented_key, Caller, OptionalJson};
use super::AppState;
use crate::auth;
use crate::store::{ApiKey, StoreError};

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    /// A label for people; not secret.
    pub name: Option<String>,
    /// Whether the key may manage keys. The first key is always an admin.
    #[serde(default)]
    pub admin: bool,
}

/// A newly created key; `key` is shown only in this response.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub id: Uuid,
    pub key: String,
    pub name: Option<String>,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub name: Option<String>,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub api_keys: Vec<KeyView>,
}

impl From<ApiKey> for KeyView {
    fn from(key: ApiKey) -> Self {
        Self {
            id: key.id,
            name: key.name,
            admin: key.admin,
            created_at: key.created_at,
        }
    }
}

/// Creates an API key. Open while no key exists (that first key is an admin);
/// afterwards it needs an admin key.
#[utoipa::path(post, path = "/api-keys", request_body(content = Option<CreateKeyBody>), responses(
    (status = 201, body = CreatedKey), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security((), ("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<CreateKeyBody>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    if body.name.as_ref().is_some_and(|n| n.len() > 128) {
        return Err(ApiError::invalid_request("name must be at most 128 bytes"));
    }
    let generated = auth::generate_key();
    let name = body.name.as_deref();
    let record = match state.store.insert_first_key(name, &generated.hash).await? {
        Some(first) => first,
        None => {
            let caller = auth::authenticate(&state.store, presented_key(&headers)).await?;
            Caller(caller).require_admin()?;
            state
                .store
                .insert_key(name, body.admin, &generated.hash)
                .await?
        }
    };
    tracing::info!(key_id = %record.id, admin = record.admin, "api key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: record.id,
            key: generated.secret,
            name: record.name,
            admin: record.admin,
            created_at: record.created_at,
        }),
    ))
}

/// Lists active keys (never their secrets). Admin only.
#[utoipa::path(get, path = "/api-keys", responses(
    (status = 200, body = KeyList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<KeyList>, ApiError> {
    caller.require_admin()?;
    let keys = state.store.list_keys().await?;
    Ok(Json(KeyList {
        api_keys: keys.into_iter().map(KeyView::from).collect(),
    }))
}

/// Revokes a key; it is refused from then on. The last admin key cannot be revoked.
#[utoipa::path(delete, path = "/api-keys/{id}", params(("id" = String, Path)), responses(
    (status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "api_key_not_found",
            format!("API key {id:?} not found"),
        )
    };
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    match state.store.revoke_key(uuid).await {
        Ok(true) => {
            tracing::info!(key_id = %uuid, "api key revoked");
            Ok(StatusCode::NO_CONTENT)
        }
        Ok(false) => Err(not_found()),
        Err(StoreError::Conflict) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "last_admin_key",
            "this is the last admin key; create another admin key first",
        )),
        Err(e) => Err(e.into()),
    }
}
