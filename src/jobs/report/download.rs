//! `GET /reports/{id}/{format}?expires=...&signature=...`: streams one file
//! of a completed report to whoever holds a valid signed link.
//!
//! Same rules as export downloads (it shares their state): the signature,
//! over `report/<id>/<format>`, is checked first (403 on any problem); the
//! object key comes from the job row, never from the request.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::executor::signed_id;
use super::request::OutputFormat;
use super::store;
use crate::jobs::export::download::Downloads;

fn plain(code: StatusCode, text: &'static str) -> Response {
    (code, text).into_response()
}

/// Serves one report file download.
pub async fn serve(
    downloads: Option<&Downloads>,
    id: &str,
    format: &str,
    query: &HashMap<String, String>,
) -> Response {
    let forbidden = || {
        plain(
            StatusCode::FORBIDDEN,
            "forbidden: the link is invalid or has expired\n",
        )
    };
    let (Some(d), Ok(format)) = (downloads, OutputFormat::parse(format)) else {
        return forbidden();
    };
    let Some(signer) = &d.signer else {
        return forbidden();
    };
    let (Some(expires), Some(signature)) = (
        query.get("expires").and_then(|e| e.parse::<i64>().ok()),
        query.get("signature"),
    ) else {
        return forbidden();
    };
    if !signer.verify(
        &signed_id(id, format.as_str()),
        expires,
        signature,
        Utc::now(),
    ) {
        return forbidden();
    }
    let job = async {
        let client = d
            .pool
            .get()
            .await
            .map_err(|e| crate::db::pool_error_cause(&e))?;
        store::get_job(&**client, id)
            .await
            .map_err(|e| crate::db::root_cause(&e))
    }
    .await;
    let job = match job {
        Ok(Some(j)) => j,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such report\n"),
        Err(e) => {
            tracing::warn!(error = %e, "report download: database unavailable");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
    };
    if job.status != "completed" {
        return plain(StatusCode::CONFLICT, "the report is not completed\n");
    }
    let Some(key) = job
        .artifacts
        .as_ref()
        .and_then(|a| a[format.as_str()]["key"].as_str())
        .map(str::to_owned)
    else {
        return plain(
            StatusCode::NOT_FOUND,
            "the report has no file in this format\n",
        );
    };
    let object = match d.storage.store.get(&Path::from(key.as_str())).await {
        Ok(o) => o,
        Err(object_store::Error::NotFound { .. }) => {
            return plain(StatusCode::GONE, "the report's file is gone\n")
        }
        Err(e) => {
            tracing::warn!(error = %e, "report download: object storage unavailable");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
    };
    let size = object.meta.size;
    let file_name = key
        .rsplit('/')
        .next()
        .map(crate::jobs::export::request::sanitize_file_name)
        .unwrap_or_default();
    let body = Body::from_stream(object.into_stream().map_err(std::io::Error::other));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, format.content_type().to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        ],
        body,
    )
        .into_response()
}
