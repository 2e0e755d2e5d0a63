//! Downloading a bundle to a `.part` file: streamed, resumed with HTTP
//! `Range`, its sha256 checked before anyone reads it.

use crate::names::hex_digest;
use crate::pull::{Progress, ProgressFn};
use crate::{CatalogError, blocking};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use url::Url;

/// Progress is reported at most once per this many bytes.
const PROGRESS_STEP: u64 = 1 << 20;

/// The HTTP client of catalog downloads: rustls with both the system's and
/// the bundled (webpki) root certificates.
pub(crate) fn http_client() -> Result<reqwest::Client, CatalogError> {
    reqwest::Client::builder()
        .user_agent(format!(
            "banger/{}",
            banger_version::BuildInfo::current().version
        ))
        .connect_timeout(Duration::from_secs(30))
        // A stalled transfer fails instead of hanging; the .part stays for a resume.
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| CatalogError::Http {
            url: String::new(),
            reason: format!("setting up the HTTP client: {}", describe(&e)),
        })
}

/// A reqwest error with its causes, on one line.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let c_text = c.to_string();
        if !s.contains(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        cur = c.source();
    }
    s
}

/// A downloaded, verified bundle. The `.part` file stays locked (so no
/// other pull touches it) until this is dropped; [`VerifiedPart::remove`]
/// deletes it once it has been unpacked.
pub(crate) struct VerifiedPart {
    pub(crate) path: PathBuf,
    _lock: Flock<File>,
}

impl VerifiedPart {
    pub(crate) fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What to download.
pub(crate) struct Source<'a> {
    pub(crate) url: &'a str,
    pub(crate) sha256: &'a str,
    pub(crate) size: u64,
}

/// Downloads `src` to `part` (resuming from what `part` already holds) and
/// checks its size and sha256. A corrupt download is deleted; an
/// interrupted one is kept for the next attempt.
pub(crate) async fn fetch(
    src: &Source<'_>,
    part: &Path,
    progress: &ProgressFn,
    cancel: &CancellationToken,
) -> Result<VerifiedPart, CatalogError> {
    let url = Url::parse(src.url).map_err(|e| CatalogError::Http {
        url: src.url.to_string(),
        reason: format!("not a URL: {e}"),
    })?;
    if let Some(dir) = part.parent() {
        std::fs::create_dir_all(dir)
            .map_err(CatalogError::io(format!("creating {}", dir.display())))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(CatalogError::io(format!("opening {}", part.display())))?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            CatalogError::Busy(part.to_path_buf())
        } else {
            CatalogError::Io {
                context: format!("locking {}", part.display()),
                source: errno.into(),
            }
        }
    })?;
    let writer = lock
        .try_clone()
        .map_err(CatalogError::io(format!("opening {}", part.display())))?;
    let mut dl = Download {
        url: &url,
        src,
        part,
        file: tokio::fs::File::from_std(writer),
        hasher: Sha256::new(),
        have: 0,
        progress,
        reported: 0,
    };
    dl.start().await?;
    let result = dl.transfer(cancel).await;
    // Whatever happened, what was written must be on file before the next
    // attempt measures the .part.
    let flushed = dl.file.flush().await;
    if result.is_err() && dl.have == 0 {
        // Nothing to resume from: leave no empty .part behind.
        let _ = std::fs::remove_file(part);
    }
    result?;
    flushed.map_err(CatalogError::io(format!("writing {}", part.display())))?;
    let actual = hex_digest(dl.hasher);
    if actual != src.sha256 {
        let _ = std::fs::remove_file(part);
        return Err(CatalogError::Sha256Mismatch {
            url: src.url.to_string(),
            expected: src.sha256.to_string(),
            actual,
        });
    }
    Ok(VerifiedPart {
        path: part.to_path_buf(),
        _lock: lock,
    })
}

struct Download<'a> {
    url: &'a Url,
    src: &'a Source<'a>,
    part: &'a Path,
    file: tokio::fs::File,
    hasher: Sha256,
    /// Bytes of the bundle in the .part file (and in `hasher`).
    have: u64,
    progress: &'a ProgressFn,
    reported: u64,
}

impl Download<'_> {
    /// Takes over what an earlier attempt left in the .part file.
    async fn start(&mut self) -> Result<(), CatalogError> {
        let len = self
            .file
            .metadata()
            .await
            .map_err(CatalogError::io(format!("reading {}", self.part.display())))?
            .len();
        if len > self.src.size {
            self.restart().await?;
        } else if len > 0 {
            let path = self.part.to_path_buf();
            let mut hasher = Sha256::new();
            self.hasher = blocking(move || {
                let mut f = File::open(&path)
                    .map_err(CatalogError::io(format!("reading {}", path.display())))?;
                let mut buf = vec![0u8; 1 << 20];
                let mut left = len;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = f
                        .read(&mut buf[..want])
                        .map_err(CatalogError::io(format!("reading {}", path.display())))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                }
                Ok(hasher)
            })
            .await?;
            self.have = len;
            tracing::info!(part = %self.part.display(), bytes = len, "resuming bundle download");
        }
        let dir = self.part.parent().unwrap_or(Path::new("."));
        check_space(dir, self.src.size - self.have)?;
        self.report(true);
        Ok(())
    }

    /// Starts over from byte 0.
    async fn restart(&mut self) -> Result<(), CatalogError> {
        self.file
            .set_len(0)
            .await
            .map_err(CatalogError::io(format!(
                "truncating {}",
                self.part.display()
            )))?;
        self.file
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(CatalogError::io(format!(
                "truncating {}",
                self.part.display()
            )))?;
        self.hasher = Sha256::new();
        self.have = 0;
        self.report(true);
        Ok(())
    }

    fn report(&mut self, force: bool) {
        if force
            || self.have.saturating_sub(self.reported) >= PROGRESS_STEP
            || self.have == self.src.size
        {
            self.reported = self.have;
            (self.progress)(Progress::Download {
                done: self.have,
                total: self.src.size,
            });
        }
    }

    async fn transfer(&mut self, cancel: &CancellationToken) -> Result<(), CatalogError> {
        if self.have == self.src.size {
            return Ok(());
        }
        self.file
            .seek(std::io::SeekFrom::Start(self.have))
            .await
            .map_err(CatalogError::io(format!("seeking {}", self.part.display())))?;
        match self.url.scheme() {
            "http" | "https" => self.transfer_http(cancel).await,
            "file" => self.transfer_file(cancel).await,
            other => Err(CatalogError::Http {
                url: self.src.url.to_string(),
                reason: format!("scheme {other} is not supported: use http, https or file"),
            }),
        }
    }

    async fn transfer_http(&mut self, cancel: &CancellationToken) -> Result<(), CatalogError> {
        let client = http_client()?;
        let http = |reason: String| CatalogError::Http {
            url: self.src.url.to_string(),
            reason,
        };
        let mut resp = None;
        // Two tries: the second without Range, when the server refuses the
        // range of a .part it cannot continue.
        for _ in 0..2 {
            let mut req = client.get(self.url.clone());
            if self.have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={}-", self.have));
            }
            let r = tokio::select! {
                _ = cancel.cancelled() => return Err(CatalogError::Cancelled),
                r = req.send() => r.map_err(|e| http(describe(&e)))?,
            };
            match r.status() {
                reqwest::StatusCode::RANGE_NOT_SATISFIABLE if self.have > 0 => {
                    tracing::warn!(
                        url = self.src.url,
                        offset = self.have,
                        "server refused the range; starting over"
                    );
                    self.restart().await?;
                }
                _ => {
                    resp = Some(r);
                    break;
                }
            }
        }
        let Some(mut resp) = resp else {
            return Err(http(
                "the server refused to send the bundle from its start".into(),
            ));
        };
        let status = resp.status();
        if status == reqwest::StatusCode::PARTIAL_CONTENT && self.have > 0 {
            let start = content_range_start(&resp, self.src.size).map_err(http)?;
            if start != self.have {
                return Err(http(format!(
                    "asked for the bundle from byte {}, the server sent it from byte {start}",
                    self.have
                )));
            }
        } else if status == reqwest::StatusCode::OK {
            if self.have > 0 {
                tracing::warn!(
                    url = self.src.url,
                    offset = self.have,
                    "server ignored the range; starting over"
                );
                self.restart().await?;
            }
        } else {
            return Err(http(format!("the server answered {status}")));
        }
        if let Some(len) = resp.content_length()
            && self.have + len != self.src.size
        {
            self.discard();
            return Err(CatalogError::SizeMismatch {
                url: self.src.url.to_string(),
                expected: self.src.size,
                actual: self.have + len,
            });
        }
        loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => return Err(CatalogError::Cancelled),
                c = resp.chunk() => c,
            };
            match chunk {
                Ok(Some(bytes)) => self.write(&bytes).await?,
                Ok(None) => break,
                Err(e) => return Err(self.incomplete(describe(&e))),
            }
        }
        if self.have < self.src.size {
            return Err(self.incomplete("the server closed the connection".into()));
        }
        Ok(())
    }

    async fn transfer_file(&mut self, cancel: &CancellationToken) -> Result<(), CatalogError> {
        let path = self.url.to_file_path().map_err(|()| CatalogError::Http {
            url: self.src.url.to_string(),
            reason: "not a local file path".into(),
        })?;
        let ctx = format!("reading {}", path.display());
        let mut src = tokio::fs::File::open(&path)
            .await
            .map_err(CatalogError::io(ctx.clone()))?;
        let len = src
            .metadata()
            .await
            .map_err(CatalogError::io(ctx.clone()))?
            .len();
        if len != self.src.size {
            return Err(CatalogError::SizeMismatch {
                url: self.src.url.to_string(),
                expected: self.src.size,
                actual: len,
            });
        }
        src.seek(std::io::SeekFrom::Start(self.have))
            .await
            .map_err(CatalogError::io(ctx.clone()))?;
        let mut buf = vec![0u8; 1 << 20];
        while self.have < self.src.size {
            if cancel.is_cancelled() {
                return Err(CatalogError::Cancelled);
            }
            let n = src
                .read(&mut buf)
                .await
                .map_err(CatalogError::io(ctx.clone()))?;
            if n == 0 {
                return Err(self.incomplete(format!("{} got shorter", path.display())));
            }
            self.write(&buf[..n]).await?;
        }
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), CatalogError> {
        let end = self.have + bytes.len() as u64;
        if end > self.src.size {
            self.discard();
            return Err(CatalogError::SizeMismatch {
                url: self.src.url.to_string(),
                expected: self.src.size,
                actual: end,
            });
        }
        self.file
            .write_all(bytes)
            .await
            .map_err(CatalogError::io(format!("writing {}", self.part.display())))?;
        self.hasher.update(bytes);
        self.have = end;
        self.report(false);
        Ok(())
    }

    fn incomplete(&self, reason: String) -> CatalogError {
        CatalogError::Incomplete {
            url: self.src.url.to_string(),
            got: self.have,
            expected: self.src.size,
            reason,
        }
    }

    /// The download is not the bundle the catalog describes: resuming it
    /// would only repeat the error.
    fn discard(&self) {
        let _ = std::fs::remove_file(self.part);
    }
}

/// The first byte of a 206 answer, from `Content-Range: bytes A-B/TOTAL`;
/// TOTAL must be the bundle size when it is given.
fn content_range_start(resp: &reqwest::Response, size: u64) -> Result<u64, String> {
    let raw = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .ok_or("the server sent part of the bundle without a Content-Range")?
        .to_str()
        .map_err(|_| "the server sent an unreadable Content-Range")?;
    parse_content_range(raw, size)
}

fn parse_content_range(raw: &str, size: u64) -> Result<u64, String> {
    let bad = || format!("the server sent Content-Range {raw:?}");
    let rest = raw.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, total) = rest.split_once('/').ok_or_else(bad)?;
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end: u64 = end.trim().parse().map_err(|_| bad())?;
    if end + 1 != size || start > end {
        return Err(format!(
            "{}, which does not run to the end of the {size}-byte bundle",
            bad()
        ));
    }
    if total.trim() != "*" && total.trim().parse::<u64>().map_err(|_| bad())? != size {
        return Err(format!(
            "{}, but the catalog says the bundle is {size} bytes",
            bad()
        ));
    }
    Ok(start)
}

/// Fails unless the file system of `dir` has `needed` bytes free for us.
pub(crate) fn check_space(dir: &Path, needed: u64) -> Result<(), CatalogError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| CatalogError::Io {
        context: format!("checking free space in {}", dir.display()),
        source: e.into(),
    })?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let available = u64::from(st.blocks_available()).saturating_mul(st.fragment_size());
    if needed > available {
        return Err(CatalogError::NoSpace {
            dir: dir.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_must_start_where_asked_and_end_at_the_bundle_end() {
        assert_eq!(parse_content_range("bytes 100-999/1000", 1000), Ok(100));
        assert_eq!(parse_content_range("bytes 0-999/*", 1000), Ok(0));
        for bad in [
            "bytes 100-998/1000",
            "bytes 100-999/2000",
            "bytes 100-999",
            "items 100-999/1000",
            "bytes x-999/1000",
            "bytes 999-100/1000",
        ] {
            assert!(parse_content_range(bad, 1000).is_err(), "{bad}");
        }
    }

    #[test]
    fn free_space_is_checked() {
        let t = tempfile::tempdir().expect("tempdir");
        check_space(t.path(), 1).expect("a byte fits");
        let err = check_space(t.path(), u64::MAX).expect_err("too much");
        assert!(matches!(err, CatalogError::NoSpace { .. }), "{err}");
    }
}
