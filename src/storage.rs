//! Object storage for artifacts the worker produces (export files,
//! snapshot manifests), through the `object_store` crate: a local
//! directory by default, S3-compatible storage when configured by URL.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::ObjectStore;

use crate::config::StorageConfig;

/// A storage problem phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("object storage at {url} cannot be opened ({cause}): fix storage.url")]
pub struct StorageError {
    url: String,
    cause: String,
}

/// The opened store, and (for S3) the same store typed, for presigned URLs.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Where objects are read and written.
    pub store: Arc<dyn ObjectStore>,
    /// Set for S3-compatible storage: signs download URLs.
    pub s3: Option<Arc<AmazonS3>>,
}

/// Opens the store named by `storage.url`:
/// - `file:///abs/dir` or a plain path: a local directory (created if missing);
/// - `s3://bucket[/prefix]`: S3-compatible storage, credentials and endpoint
///   from the standard `AWS_*` environment variables (`AWS_ENDPOINT` for
///   MinIO and the like), never from the config file.
pub fn open(config: &StorageConfig) -> Result<Storage, StorageError> {
    let url = config.url.as_str();
    let fail = |cause: String| StorageError {
        url: url.to_owned(),
        cause,
    };
    if url.starts_with("s3://") {
        let s3 = AmazonS3Builder::from_env()
            .with_url(url)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let s3 = Arc::new(s3);
        return Ok(Storage {
            store: s3.clone(),
            s3: Some(s3),
        });
    }
    let dir = url.strip_prefix("file://").unwrap_or(url);
    if dir.is_empty() {
        return Err(fail("empty path".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    // fsync: an export checkpoints a part only after it is written, which
    // must mean "on disk", not "in the page cache".
    let local = LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| fail(e.to_string()))?
        .with_fsync(true);
    Ok(Storage {
        store: Arc::new(local),
        s3: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};

    #[tokio::test]
    async fn a_local_directory_store_is_created_and_round_trips_objects() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("artifacts");
        let storage = open(&StorageConfig {
            url: format!("file://{}", root.display()),
        })
        .unwrap();
        assert!(storage.s3.is_none());
        let path = Path::from("exports/a.txt");
        storage
            .store
            .put(&path, PutPayload::from_static(b"hello"))
            .await
            .unwrap();
        let got = storage
            .store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], b"hello");
        assert!(root.join("exports/a.txt").exists());
    }
}
