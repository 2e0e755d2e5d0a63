//! The blob cache: `<cache>/oci/blobs/sha256/<hex>`, content-addressed.
//!
//! A blob is streamed into a temporary file of the cache while its sha256
//! and size are checked, and renamed into place only when both match, so a
//! blob in the cache is always verified and a later pull reuses it without
//! network.

use crate::registry::{Descriptor, check_digest};
use crate::{OciError, free_space};
use futures::StreamExt;
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Free space kept on the cache's file system beyond a blob.
const CACHE_RESERVE: u64 = 64 << 20;

/// The layer cache under a caller-chosen directory.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

/// Removes a temporary download unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl BlobCache {
    /// The cache under `cache_dir` (its `oci/` subdirectory).
    pub fn new(cache_dir: &Path) -> BlobCache {
        BlobCache {
            dir: cache_dir.join("oci"),
        }
    }

    /// Where the blob `digest` is (or would be) kept.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let hex = check_digest(digest)?;
        Ok(self.dir.join("blobs/sha256").join(hex))
    }

    /// Whether a blob of `size` bytes is cached for `digest`. Its content was
    /// verified when it was stored.
    pub fn has(&self, digest: &str, size: u64) -> bool {
        self.blob_path(digest)
            .is_ok_and(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size))
    }

    /// Makes sure `desc` is in the cache: reuses it, or downloads it from
    /// `reference`'s repository. Returns whether it was downloaded.
    /// `on_bytes(done, total)` follows the download.
    pub(crate) async fn ensure(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &Descriptor,
        on_bytes: &(dyn Fn(u64, u64) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<bool, OciError> {
        let size = u64::try_from(desc.size).map_err(|_| OciError::SizeMismatch {
            digest: desc.digest.clone(),
            expected: 0,
            actual: 0,
        })?;
        let dest = self.blob_path(&desc.digest)?;
        if self.has(&desc.digest, size) {
            on_bytes(size, size);
            return Ok(false);
        }
        let tmp_dir = self.dir.join("tmp");
        for d in [&tmp_dir, &self.dir.join("blobs/sha256")] {
            std::fs::create_dir_all(d)
                .map_err(OciError::io(format!("creating {}", d.display())))?;
        }
        let available = free_space(&tmp_dir)?;
        if size.saturating_add(CACHE_RESERVE) > available {
            return Err(OciError::NoSpace {
                path: self.dir.clone(),
                what: format!("blob {}", desc.digest),
                needed: size.saturating_add(CACHE_RESERVE),
                available,
            });
        }
        let tmp_path = tmp_dir.join(format!(
            "{}.{:016x}",
            dest.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            rand::random::<u64>()
        ));
        let mut guard = TempFile(Some(tmp_path.clone()));
        let ctx = || format!("writing {}", tmp_path.display());
        let mut file = tokio::fs::File::create(&tmp_path)
            .await
            .map_err(OciError::io(ctx()))?;

        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size,
            ..Default::default()
        };
        let mut stream = tokio::select! {
            s = client.pull_blob_stream(reference, &oci_desc) => {
                s.map_err(|e| crate::registry::registry_error(reference, e))?
            }
            _ = cancel.cancelled() => return Err(OciError::Cancelled),
        };
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        on_bytes(0, size);
        let stream_error = loop {
            let chunk = tokio::select! {
                c = stream.next() => c,
                _ = cancel.cancelled() => return Err(OciError::Cancelled),
            };
            match chunk {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok(bytes)) => {
                    got += bytes.len() as u64;
                    if got > size {
                        return Err(OciError::SizeMismatch {
                            digest: desc.digest.clone(),
                            expected: size,
                            actual: got,
                        });
                    }
                    hasher.update(&bytes);
                    file.write_all(&bytes).await.map_err(OciError::io(ctx()))?;
                    on_bytes(got, size);
                }
            }
        };
        // Our own checks first: they name the problem better than the
        // client's verifying stream, which fails on the same mismatches.
        if got != size {
            return Err(OciError::SizeMismatch {
                digest: desc.digest.clone(),
                expected: size,
                actual: got,
            });
        }
        let actual = format!("{:x}", hasher.finalize());
        if format!("sha256:{actual}") != desc.digest {
            return Err(OciError::DigestMismatch {
                digest: desc.digest.clone(),
                actual,
            });
        }
        if let Some(e) = stream_error {
            return Err(OciError::Io {
                context: format!("downloading blob {}", desc.digest),
                source: e,
            });
        }
        file.sync_all().await.map_err(OciError::io(ctx()))?;
        drop(file);
        std::fs::rename(&tmp_path, &dest)
            .map_err(OciError::io(format!("moving blob into {}", dest.display())))?;
        guard.0 = None;
        Ok(true)
    }

    /// Removes temporary downloads a killed pull left behind (older than an
    /// hour, so that concurrent pulls keep theirs).
    pub fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        let hour = std::time::Duration::from_secs(3600);
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > hour);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
