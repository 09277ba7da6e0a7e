//! `GET /exports/{id}/download?expires=...&signature=...`: streams a
//! completed export's artifact to whoever holds a valid signed link.
//!
//! The signature is checked before anything else (403 on any problem, with
//! no hint which); the id is then looked up in export_jobs and the object
//! key comes from the row, never from the request, so no path trick can
//! reach another object.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::link::LinkSigner;
use super::record;
use super::request::Compression;
use crate::storage::Storage;

/// What the download endpoint needs.
#[derive(Clone)]
pub struct Downloads {
    pub pool: deadpool_postgres::Pool,
    pub storage: Storage,
    /// `None`: no link secret configured, every request gets 403.
    pub signer: Option<LinkSigner>,
}

fn plain(code: StatusCode, text: &'static str) -> Response {
    (code, text).into_response()
}

/// Serves one download request.
pub async fn serve(
    downloads: Option<&Downloads>,
    id: &str,
    query: &HashMap<String, String>,
) -> Response {
    let forbidden = || {
        plain(
            StatusCode::FORBIDDEN,
            "forbidden: the link is invalid or has expired\n",
        )
    };
    let Some(d) = downloads else {
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
    if !signer.verify(id, expires, signature, Utc::now()) {
        return forbidden();
    }
    let artifact = async {
        let client = d
            .pool
            .get()
            .await
            .map_err(|e| crate::db::pool_error_cause(&e))?;
        record::artifact(&**client, id)
            .await
            .map_err(|e| crate::db::root_cause(&e))
    }
    .await;
    let artifact = match artifact {
        Ok(Some(a)) => a,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such export\n"),
        Err(e) => {
            tracing::warn!(error = %e, "export download: database unavailable");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
    };
    if artifact.status != "completed" {
        return plain(StatusCode::CONFLICT, "the export is not completed\n");
    }
    if artifact.removed || artifact.expires_at.is_some_and(|e| e < Utc::now()) {
        return plain(StatusCode::GONE, "the export has expired and was removed\n");
    }
    let object = match d
        .storage
        .store
        .get(&Path::from(artifact.artifact_key.as_str()))
        .await
    {
        Ok(o) => o,
        Err(object_store::Error::NotFound { .. }) => {
            return plain(StatusCode::GONE, "the export's file is gone\n")
        }
        Err(e) => {
            tracing::warn!(error = %e, "export download: object storage unavailable");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
    };
    let size = object.meta.size;
    let file_name = artifact
        .artifact_key
        .rsplit('/')
        .next()
        .map(super::request::sanitize_file_name)
        .unwrap_or_default();
    let content_type = match artifact.compression {
        Compression::Gzip => "application/gzip",
        Compression::Zstd => "application/zstd",
        Compression::None => artifact.format.content_type(),
    };
    let body = Body::from_stream(object.into_stream().map_err(std::io::Error::other));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
        ],
        body,
    )
        .into_response()
}
