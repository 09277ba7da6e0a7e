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
    match stream(d, id).await {
        Ok(response) => response,
        Err(DownloadError::NotFound) => plain(StatusCode::NOT_FOUND, "no such export\n"),
        Err(DownloadError::NotCompleted) => {
            plain(StatusCode::CONFLICT, "the export is not completed\n")
        }
        Err(DownloadError::Expired) => {
            plain(StatusCode::GONE, "the export has expired and was removed\n")
        }
        Err(DownloadError::FileGone) => plain(StatusCode::GONE, "the export's file is gone\n"),
        Err(DownloadError::Unavailable(e)) => {
            tracing::warn!(error = %e, "export download: database or object storage unavailable");
            plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n")
        }
    }
}

/// Why an artifact cannot be streamed.
#[derive(Debug)]
pub enum DownloadError {
    /// No job has this id.
    NotFound,
    /// The job has not completed (yet, or ever).
    NotCompleted,
    /// The download window is over and the artifact was removed.
    Expired,
    /// The job completed but its file is missing from the store.
    FileGone,
    /// The database or the object store failed (the cause, for the log).
    Unavailable(String),
}

/// Streams the artifact of completed job `id`, whoever has already
/// checked the caller's right to it (a signed link, or an API key).
pub async fn stream(d: &Downloads, id: &str) -> Result<Response, DownloadError> {
    stream_file(d, id, JobFile::Artifact).await
}

/// Which file of a completed job to stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobFile {
    /// The export file.
    Artifact,
    /// The inclusion proofs beside a subject access export.
    Proofs,
}

/// Streams one file of completed job `id` (see [`stream`]).
pub async fn stream_file(
    d: &Downloads,
    id: &str,
    file: JobFile,
) -> Result<Response, DownloadError> {
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
    .await
    .map_err(DownloadError::Unavailable)?
    .ok_or(DownloadError::NotFound)?;
    if artifact.status != "completed" {
        return Err(DownloadError::NotCompleted);
    }
    if artifact.removed || artifact.expires_at.is_some_and(|e| e < Utc::now()) {
        return Err(DownloadError::Expired);
    }
    let path = match file {
        JobFile::Artifact => Path::from(artifact.artifact_key.as_str()),
        JobFile::Proofs => crate::jobs::gdpr::access::proofs_path(&artifact.artifact_key),
    };
    let object = match d.storage.store.get(&path).await {
        Ok(o) => o,
        Err(object_store::Error::NotFound { .. }) => return Err(DownloadError::FileGone),
        Err(e) => return Err(DownloadError::Unavailable(e.to_string())),
    };
    let size = object.meta.size;
    let file_name = path
        .filename()
        .map(super::request::sanitize_file_name)
        .unwrap_or_default();
    let content_type = match (file, artifact.compression) {
        (JobFile::Proofs, _) => "application/x-ndjson",
        (JobFile::Artifact, Compression::Gzip) => "application/gzip",
        (JobFile::Artifact, Compression::Zstd) => "application/zstd",
        (JobFile::Artifact, Compression::None) => artifact.format.content_type(),
    };
    let body = Body::from_stream(object.into_stream().map_err(std::io::Error::other));
    Ok((
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
        .into_response())
}
