//! `/v1/checkpoints`: the latest signed checkpoint of the verifiable log
//! and the snapshots that produced checkpoints, newest first. The log is
//! one for all organisations: checkpoints reveal sizes and roots, no event.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::keys::Permission;
use super::problem::Problem;
use super::{ApiQuery, ApiState};

/// The checkpoint routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(list_checkpoints))
}

/// One snapshot and the checkpoint it signed.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotCheckpoint {
    pub snapshot_id: i64,
    pub tree_size: i64,
    pub previous_tree_size: i64,
    pub record_count: i64,
    /// Root of the whole log at tree_size (hex).
    pub root: String,
    /// The C2SP signed note.
    pub checkpoint: String,
    pub key_name: String,
    pub range_from: Option<DateTime<Utc>>,
    pub range_to: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// The latest checkpoint and a page of snapshots.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoints {
    /// The latest signed checkpoint (the log's head); null before the first snapshot.
    pub latest: Option<String>,
    pub snapshots: Vec<SnapshotCheckpoint>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Paging of snapshots.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CheckpointParams {
    /// Snapshots per page (default api.default_page_size; more than
    /// api.max_page_size is reduced to it).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page.
    #[param(pattern = "^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

/// The latest signed checkpoint and the snapshots, newest first.
#[utoipa::path(
    get,
    path = "/v1/checkpoints",
    tag = "proofs",
    params(CheckpointParams),
    responses(
        (status = 200, description = "The latest checkpoint and a page of snapshots", body = Checkpoints),
        (status = 400, description = "Malformed query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid limit or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_checkpoints(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiQuery(page): ApiQuery<CheckpointParams>,
) -> Result<axum::Json<Checkpoints>, Problem> {
    caller.require(Permission::Proof)?;
    let limit = state.pages.limit(page.limit)?;
    let before: Option<i64> = match page.cursor.as_deref() {
        None => None,
        Some(c) => Some(c.parse().map_err(|_| {
            Problem::invalid("cursor is not one this API returned: pass nextCursor unchanged")
        })?),
    };
    let unavailable = |e: tokio_postgres::Error| Problem::unavailable(&crate::db::root_cause(&e));
    let client = state
        .pool
        .get()
        .await
        .map_err(|e| Problem::unavailable(&crate::db::pool_error_cause(&e)))?;
    let latest = crate::jobs::tile_store::latest_checkpoint(&**client)
        .await
        .map_err(unavailable)?;
    let rows = client
        .query(
            "SELECT id, tree_size, previous_tree_size, record_count, encode(root, 'hex'), \
                    checkpoint_note, key_name, range_from, range_to, created_at \
               FROM snapshots WHERE ($1::bigint IS NULL OR id < $1) \
              ORDER BY id DESC LIMIT $2",
            &[&before, &(limit + 1)],
        )
        .await
        .map_err(unavailable)?;
    let mut snapshots: Vec<SnapshotCheckpoint> = rows
        .iter()
        .map(|r| SnapshotCheckpoint {
            snapshot_id: r.get(0),
            tree_size: r.get(1),
            previous_tree_size: r.get(2),
            record_count: r.get(3),
            root: r.get(4),
            checkpoint: r.get(5),
            key_name: r.get(6),
            range_from: r.get(7),
            range_to: r.get(8),
            created_at: r.get(9),
        })
        .collect();
    let next_cursor = if snapshots.len() as i64 > limit {
        snapshots.truncate(limit as usize);
        snapshots.last().map(|s| s.snapshot_id.to_string())
    } else {
        None
    };
    Ok(axum::Json(Checkpoints {
        latest,
        snapshots,
        next_cursor,
    }))
}
