//! `/v1/proofs/{event}`: an event as stored, and the inclusion proof that
//! places it in the signed verifiable log, computed from the stored tiles
//! (O(log n), the same proof `audit-worker prove` prints).

use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::keys::Permission;
use super::problem::{Kind, Problem};
use super::{ApiPath, ApiState};
use crate::jobs::export::format::{self, ExportRow, SELECT_LIST};
use crate::jobs::export::request::Format;
use crate::jobs::snapshot::SnapshotError;
use crate::jobs::verify::{self, InclusionProof};

/// The proof routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(get_proof))
}

/// An event and its inclusion proof.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventProof {
    /// Always true here (an unsealed event answers 409 not-sealed).
    pub sealed: bool,
    /// The stored event in the export's record form (one NDJSON record).
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
    /// The Merkle leaf hash, SHA-256(0x00 || leaf data), hex.
    pub leaf_hash: String,
    /// Everything a verifier needs with the verifier key alone: leaf data
    /// and version, leaf index, tree size, audit path, the signed
    /// checkpoint and the snapshots involved (`audit-worker verify-proof`
    /// and scripts/verify_log.py --proofs check it offline).
    pub proof: InclusionProof,
}

/// The stored event's record form, or 404.
async fn stored_event(
    client: &tokio_postgres::Client,
    caller: &Caller,
    event: &str,
) -> Result<serde_json::Value, Problem> {
    let rows = client
        .query(
            &format!(
                "SELECT {SELECT_LIST} FROM audit_log WHERE idempotency_key = $1 \
                 ORDER BY event_time, id LIMIT 10"
            ),
            &[&event],
        )
        .await
        .map_err(|e| Problem::unavailable(&crate::db::root_cause(&e)))?;
    // organization_id is column 7 of the select list. Any row outside the
    // scope hides the key entirely, so nothing about it leaks.
    let in_scope = rows
        .iter()
        .all(|r| caller.scope().covers(r.get::<_, Option<&str>>(7)));
    if rows.is_empty() || !in_scope {
        return Err(Problem::not_found("event"));
    }
    if rows.len() > 1 {
        return Err(Problem::new(
            Kind::Conflict,
            StatusCode::CONFLICT,
            "several stored events share this key (they differ by timestamp): prove them with `audit-worker prove`",
        ));
    }
    let row = ExportRow::from_pg(&rows[0]).map_err(|e| Problem::internal(&e.to_string()))?;
    let mut out = Vec::new();
    format::write_rows(Format::Ndjson, &[row], 0, &mut out)
        .map_err(|e| Problem::internal(&e.to_string()))?;
    serde_json::from_slice(&out).map_err(|e| Problem::internal(&e.to_string()))
}

/// An event with its inclusion proof.
///
/// `event` is the eventId (the idempotency key). An event of an
/// organisation outside the key's scope answers 404, like an unknown one.
#[utoipa::path(
    get,
    path = "/v1/proofs/{event}",
    tag = "proofs",
    params(("event" = String, Path, description = "The event's eventId / idempotency key")),
    responses(
        (status = 200, description = "The event and its inclusion proof", body = EventProof),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Permission missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such event visible to this key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Stored but not sealed yet (not-sealed), or ambiguous", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_proof(
    caller: Caller,
    axum::extract::State(state): axum::extract::State<ApiState>,
    ApiPath(event): ApiPath<String>,
) -> Result<axum::Json<EventProof>, Problem> {
    caller.require(Permission::Proof)?;
    if event.is_empty() || event.contains('\0') {
        // No stored event can have such a key (the ingest refuses them).
        return Err(Problem::not_found("event"));
    }
    let mut client = state
        .pool
        .get()
        .await
        .map_err(|e| Problem::unavailable(&crate::db::pool_error_cause(&e)))?;
    let record = stored_event(&client, &caller, &event).await?;
    let sealed: i64 = client
        .query_one(
            "SELECT count(*) FROM audit_log a
               JOIN seal_ledger l ON l.event_time = a.event_time AND l.row_id = a.id
              WHERE a.idempotency_key = $1",
            &[&event],
        )
        .await
        .map_err(|e| Problem::unavailable(&crate::db::root_cause(&e)))?
        .get(0);
    if sealed == 0 {
        return Err(Problem::new(
            Kind::NotSealed,
            StatusCode::CONFLICT,
            "the event is stored but not sealed into the log yet: ask again after the next snapshot",
        ));
    }
    let proof = verify::prove(&mut client, &event, 10_000)
        .await
        .map_err(|e| match e {
            SnapshotError::BadRequest(m) => Problem::new(Kind::Conflict, StatusCode::CONFLICT, m),
            SnapshotError::Db(e) => Problem::unavailable(&crate::db::root_cause(&e)),
            SnapshotError::Pool(e) => Problem::unavailable(&e),
            other => Problem::internal(&other.to_string()),
        })?;
    let leaf_data = proof
        .record_digest
        .clone()
        .unwrap_or_else(|| proof.event_hash.clone());
    let leaf_hash = hex::decode(&leaf_data)
        .map(|d| hex::encode(crate::integrity::merkle::leaf_hash(&d)))
        .map_err(|e| Problem::internal(&format!("stored leaf data is not hex: {e}")))?;
    Ok(axum::Json(EventProof {
        sealed: true,
        event: record,
        leaf_hash,
        proof,
    }))
}
