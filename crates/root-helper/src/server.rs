//! The helper's socket server: reads the peer's uid with `SO_PEERCRED`,
//! checks each request against the [`Policy`], runs it through a
//! [`HostNet`] (or the chown executor) and logs every operation.

use crate::policy::{Checked, Policy, Refusal};
use crate::proto::{ErrorKind, MAX_LINE, Op, PROTOCOL_VERSION, Reply, Request, Response, Tap};
use banger_net::HostNet;
use banger_net::host::BridgeSpec;
use banger_version::BuildInfo;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Serves helper requests for one install.
pub struct Server {
    policy: Policy,
    host: Arc<dyn HostNet>,
    images: Option<ImageStore>,
}

/// Where and how the helper builds Debian images: all from the install
/// record and the root-owned system config, never from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStore {
    /// The owner daemon's image store (`/var/lib/banger/images`).
    pub images_dir: PathBuf,
    /// The owner daemon's kernel store (`/var/lib/banger/kernels`).
    pub kernels_dir: PathBuf,
    /// Root's own directory (0700, on the file system of `images_dir`)
    /// where builds run: nothing of the owner's is in the build's paths,
    /// so the owner cannot steer root's writes with a planted symlink.
    pub staging_dir: PathBuf,
    /// `debian_mirror` of the system config.
    pub mirror: Option<String>,
    /// The banger-agent binary baked into images.
    pub agent_binary: PathBuf,
}

/// The uid of the process at the other end of `stream` (`SO_PEERCRED`).
pub fn peer_uid(stream: &impl AsFd) -> std::io::Result<u32> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(cred.uid())
}

impl Server {
    pub fn new(policy: Policy, host: Arc<dyn HostNet>) -> Self {
        Self {
            policy,
            host,
            images: None,
        }
    }

    /// Lets the helper build Debian images into `images`.
    pub fn with_images(mut self, images: ImageStore) -> Self {
        self.images = Some(images);
        self
    }

    /// Answers one request line from `peer_uid`. Never panics on input.
    pub async fn handle_line(&self, peer_uid: u32, line: &str) -> Response {
        let fail = |kind, message: String| Response::Error { kind, message };
        // The version first: a client of another protocol gets this error,
        // not a parse error about an operation it thinks exists.
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(peer_uid, error = %e, "malformed request");
                return fail(ErrorKind::Malformed, format!("not a JSON request: {e}"));
            }
        };
        let version = value.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(PROTOCOL_VERSION)) {
            tracing::warn!(peer_uid, ?version, "protocol version mismatch");
            return fail(
                ErrorKind::Version,
                format!(
                    "protocol version {} is not supported (this helper speaks {PROTOCOL_VERSION}): the helper and bangerd are from different builds; re-run `sudo banger system install`",
                    version.map_or_else(|| "missing".to_string(), |v| v.to_string())
                ),
            );
        }
        let request: Request = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(peer_uid, error = %e, "unknown operation");
                return fail(
                    ErrorKind::Malformed,
                    format!("not an operation the root helper offers: {e}"),
                );
            }
        };
        let name = request.op.name();
        // The daemon checks its tables every few seconds: only a check that
        // repaired something is worth the journal's space (the daemon logs
        // a check's failure itself, once).
        let routine = matches!(request.op, Op::FirewallEnsure { .. });
        let checked = match self.policy.check(peer_uid, request.op) {
            Ok(c) => c,
            Err(Refusal { kind, message }) => {
                if routine {
                    tracing::debug!(peer_uid, op = name, %message, "refused");
                } else {
                    tracing::warn!(peer_uid, op = name, %message, "refused");
                }
                return fail(kind, message);
            }
        };
        if routine {
            tracing::debug!(peer_uid, op = name, args = ?checked, "operation");
        } else {
            tracing::info!(peer_uid, op = name, args = ?checked, "operation");
        }
        match self.execute(checked).await {
            Ok(reply) => {
                if let Reply::Repaired { guard, nat } = reply
                    && (guard || nat)
                {
                    tracing::warn!(
                        peer_uid,
                        guard,
                        nat,
                        "banger's nftables tables had been changed by someone else: made again"
                    );
                }
                Response::Ok(reply)
            }
            Err(e) => {
                if routine {
                    tracing::debug!(peer_uid, op = name, error = %e, "operation failed");
                } else {
                    tracing::warn!(peer_uid, op = name, error = %e, "operation failed");
                }
                Response::Error {
                    kind: e.kind,
                    message: e.message,
                }
            }
        }
    }

    async fn execute(&self, op: Checked) -> Result<Reply, Refusal> {
        let failed = |e: banger_net::HostNetError| Refusal {
            kind: ErrorKind::Failed,
            message: e.to_string(),
        };
        let p = &self.policy;
        let h = &self.host;
        Ok(match op {
            Checked::Hello => Reply::Hello {
                protocol: PROTOCOL_VERSION,
                build: BuildInfo::current(),
                owner_uid: p.owner_uid,
            },
            Checked::EnsureBridge => {
                let c = h
                    .ensure_bridge(&BridgeSpec {
                        name: p.bridge.clone(),
                        subnet: p.subnet,
                    })
                    .await
                    .map_err(failed)?;
                Reply::Bridge {
                    created: c.created,
                    address_added: c.address_added,
                    brought_up: c.brought_up,
                }
            }
            Checked::BridgeIndex => {
                Reply::BridgeIndex(h.bridge_index(&p.bridge).await.map_err(failed)?)
            }
            // The TAP's owner is always the install owner, never an argument.
            Checked::CreateTap(tap) => {
                h.create_tap(&tap, p.owner_uid, &p.bridge)
                    .await
                    .map_err(failed)?;
                Reply::Done
            }
            Checked::DeleteTap(tap) => {
                h.delete_tap(&tap).await.map_err(failed)?;
                Reply::Done
            }
            Checked::ListTaps => Reply::Taps(
                h.list_taps()
                    .await
                    .map_err(failed)?
                    .into_iter()
                    .map(|t| Tap {
                        name: t.name.to_string(),
                        controller: t.controller,
                        owner: t.owner,
                        up: t.up,
                    })
                    .collect(),
            ),
            Checked::NatEnable(ip) => {
                h.nat_enable(&p.subnet, ip).await.map_err(failed)?;
                Reply::Done
            }
            Checked::NatDisable(ip) => {
                h.nat_disable(&p.subnet, ip).await.map_err(failed)?;
                Reply::Done
            }
            Checked::NatRebuild(ips) => {
                h.nat_rebuild(&p.subnet, &ips.into_iter().collect())
                    .await
                    .map_err(failed)?;
                Reply::Done
            }
            Checked::GuardRebuild(bindings) => {
                h.guard_rebuild(&p.subnet, &bindings)
                    .await
                    .map_err(failed)?;
                Reply::Done
            }
            Checked::FirewallEnsure { guard, nat } => {
                let r = h
                    .firewall_ensure(&p.subnet, guard.as_ref(), &nat)
                    .await
                    .map_err(failed)?;
                Reply::Repaired {
                    guard: r.guard,
                    nat: r.nat,
                }
            }
            Checked::GuardAllow(tap, ip) => {
                h.guard_allow(&p.subnet, &tap, ip).await.map_err(failed)?;
                Reply::Done
            }
            Checked::GuardForget(tap, ip) => {
                h.guard_forget(&p.subnet, &tap, ip).await.map_err(failed)?;
                Reply::Done
            }
            Checked::ResolvedWire(dns) => {
                h.resolved_wire(&p.bridge, dns).await.map_err(failed)?;
                Reply::Done
            }
            Checked::ResolvedUnwire => {
                h.resolved_unwire(&p.bridge).await.map_err(failed)?;
                Reply::Done
            }
            Checked::ChownToOwner { dir, rel } => {
                chown_beneath(&dir, &rel, p.owner_uid, p.owner_gid)?;
                Reply::Done
            }
            Checked::BuildDebianImage { image, suite } => {
                Reply::Image(self.build_image(image, suite).await?)
            }
        })
    }

    /// Builds the image as root (mmdebstrap, chroot, mkfs need it) in the
    /// root-only staging directory, gives the result to the owner there,
    /// then renames it into the owner's stores. Progress goes to the
    /// journal: the protocol has one answer per request.
    async fn build_image(
        &self,
        image: String,
        suite: String,
    ) -> Result<banger_image::BuiltImage, Refusal> {
        let failed = |message: String| Refusal {
            kind: ErrorKind::Failed,
            message,
        };
        let store = self.images.as_ref().ok_or_else(|| {
            failed("this helper does not build images (no image store configured)".into())
        })?;
        let staging = Staging::prepare(&store.staging_dir).map_err(|e| failed(e.to_string()))?;
        let spec = banger_image::DebianBuild {
            name: image.clone(),
            suite,
            mirror: store.mirror.clone(),
            extra_packages: Vec::new(),
            payload: banger_image::GuestPayload::new(store.agent_binary.clone()),
            images_dir: staging.images.clone(),
            kernels_dir: staging.kernels.clone(),
        };
        let progress = |p: banger_image::Progress| match p {
            banger_image::Progress::Phase { name, message } => {
                tracing::info!(target: "image_build", image = %image, phase = name, "{message}");
            }
            banger_image::Progress::Line(line) => {
                tracing::info!(target: "image_build", image = %image, "{line}");
            }
        };
        // A client that goes away does not stop the build: the next request
        // finds the finished image.
        let built = banger_image::build_debian(&spec, progress, Default::default())
            .await
            .map_err(|e| failed(format!("building image {image}: {e}")))?;
        let built = self.hand_over(&staging, store, built)?;
        tracing::info!(image = %image, kernel = %built.kernel_name, existed = built.already_existed, "image built and given to the owner");
        Ok(built)
    }

    /// Gives the staged image and kernel to the owner (still out of the
    /// owner's reach), then renames them into the owner's stores without
    /// replacing anything there. A kernel the owner already has is kept.
    fn hand_over(
        &self,
        staging: &Staging,
        store: &ImageStore,
        built: banger_image::BuiltImage,
    ) -> Result<banger_image::BuiltImage, Refusal> {
        let (uid, gid) = (self.policy.owner_uid, self.policy.owner_gid);
        let failed = |message: String| Refusal {
            kind: ErrorKind::Failed,
            message,
        };
        let name = built
            .dir
            .file_name()
            .map(PathBuf::from)
            .ok_or_else(|| failed(format!("{}: no image name", built.dir.display())))?;
        let kernel = PathBuf::from(&built.kernel_name);
        let staged = [(&staging.images, &name), (&staging.kernels, &kernel)];
        let result = (|| {
            for (dir, rel) in staged {
                chown_tree_beneath(dir, rel, uid, gid)?;
            }
            let kernels = self.owner_dir(&store.kernels_dir)?;
            let images = self.owner_dir(&store.images_dir)?;
            let from = open_beneath(&staging.kernels, Path::new(""), true)?;
            match move_no_replace(&from, &kernel, &kernels) {
                Ok(()) | Err(nix::Error::EEXIST) | Err(nix::Error::ENOTEMPTY) => {}
                Err(e) => return Err(failed(move_error(&store.kernels_dir, &kernel, e))),
            }
            let from = open_beneath(&staging.images, Path::new(""), true)?;
            move_no_replace(&from, &name, &images)
                .map_err(|e| failed(move_error(&store.images_dir, &name, e)))
        })();
        // Whatever was not moved (a failure, a kernel already there) goes.
        for (dir, rel) in staged {
            let _ = std::fs::remove_dir_all(dir.join(rel));
        }
        result?;
        Ok(rebase(
            built,
            [
                (&staging.images, &store.images_dir),
                (&staging.kernels, &store.kernels_dir),
            ],
        ))
    }

    /// An fd of the owner's store `path` (created, owner's, when missing),
    /// opened without following any symlink below banger's directories.
    fn owner_dir(&self, path: &Path) -> Result<OwnedFd, Refusal> {
        match std::fs::create_dir(path) {
            Ok(()) => {
                let (dir, rel) = self.policy.inside_dirs(path)?;
                chown_beneath(&dir, &rel, self.policy.owner_uid, self.policy.owner_gid)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Refusal {
                    kind: ErrorKind::Failed,
                    message: format!("creating {}: {e}", path.display()),
                });
            }
        }
        let (dir, rel) = self.policy.inside_dirs(path)?;
        open_beneath(&dir, &rel, true)
    }

    /// Serves one connection: requests until EOF.
    pub async fn serve_conn(&self, stream: UnixStream) {
        let uid = match peer_uid(&stream) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; dropping the connection");
                return;
            }
        };
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match AsyncReadExt::take(&mut rd, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(peer_uid = uid, error = %e, "reading a request");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            let response = if line.len() > MAX_LINE {
                Response::Error {
                    kind: ErrorKind::Malformed,
                    message: format!("request longer than {MAX_LINE} bytes"),
                }
            } else {
                let text = String::from_utf8_lossy(&line);
                self.handle_line(uid, text.trim_end()).await
            };
            let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| {
                format!(r#"{{"error":{{"kind":"failed","message":"encoding the reply: {e}"}}}}"#)
                    .into_bytes()
            });
            out.push(b'\n');
            if wr.write_all(&out).await.is_err() || line.len() > MAX_LINE {
                return;
            }
        }
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let me = self.clone();
                        tokio::spawn(async move { me.serve_conn(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// The helper's build area: `<dir>/images` and `<dir>/kernels`, in a
/// directory only root can enter.
pub(crate) struct Staging {
    pub(crate) images: PathBuf,
    pub(crate) kernels: PathBuf,
}

impl Staging {
    /// Creates the area (mode 0700) and checks that it is a real directory
    /// of root's, not a symlink.
    pub(crate) fn prepare(dir: &Path) -> std::io::Result<Staging> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let context = |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!("staging directory {}: {e}", dir.display()),
            )
        };
        std::fs::create_dir_all(dir).map_err(context)?;
        let md = std::fs::symlink_metadata(dir).map_err(context)?;
        if !md.is_dir() || md.uid() != nix::unistd::geteuid().as_raw() {
            return Err(context(std::io::Error::other(
                "not a directory of the helper's own user: refused",
            )));
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(context)?;
        let staging = Staging {
            images: dir.join("images"),
            kernels: dir.join("kernels"),
        };
        for d in [&staging.images, &staging.kernels] {
            std::fs::create_dir_all(d).map_err(context)?;
        }
        Ok(staging)
    }
}

/// Renames `from_dir/name` to `to_dir/name` unless the latter exists.
fn move_no_replace(from_dir: &OwnedFd, name: &Path, to_dir: &OwnedFd) -> nix::Result<()> {
    nix::fcntl::renameat2(
        from_dir,
        name,
        to_dir,
        name,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
}

fn move_error(store: &Path, name: &Path, e: nix::Error) -> String {
    let to = store.join(name);
    match e {
        nix::Error::EEXIST | nix::Error::ENOTEMPTY => {
            format!("{} already exists: delete it first", to.display())
        }
        nix::Error::EXDEV => format!(
            "{} is on another file system than the helper's staging directory: both must be under one file system",
            store.display()
        ),
        e => format!("moving the built image to {}: {e}", to.display()),
    }
}

/// `built` with its paths moved from each staging directory to its store.
fn rebase(
    mut built: banger_image::BuiltImage,
    moves: [(&PathBuf, &PathBuf); 2],
) -> banger_image::BuiltImage {
    let map = |p: &mut PathBuf| {
        for (from, to) in moves {
            if let Ok(rest) = p.strip_prefix(from) {
                *p = to.join(rest);
                return;
            }
        }
    };
    for p in [
        &mut built.dir,
        &mut built.rootfs,
        &mut built.work_seed,
        &mut built.kernel,
        &mut built.initrd,
    ] {
        map(p);
    }
    if let Some(v) = built.vmlinux.as_mut() {
        map(v);
    }
    built
}

/// Chowns `dir/rel` to `uid:gid`, walking `rel` one plain name at a time
/// with `O_NOFOLLOW` from an fd of `dir`, so no symlink (not even one
/// swapped in after the policy check) and no `..` can lead outside.
/// (Not `openat2`: systemd's seccomp filters answer it with ENOSYS.)
pub(crate) fn chown_beneath(dir: &Path, rel: &Path, uid: u32, gid: u32) -> Result<(), Refusal> {
    let shown = dir.join(rel).display().to_string();
    let target = open_beneath(dir, rel, false)?;
    refuse_hard_links(&target, &shown)?;
    fchown_fd(&target, uid, gid, &shown)
}

/// Refuses a non-directory with more than one name: a hard link made in
/// banger's directories to a file elsewhere on the same file system
/// (`/etc/shadow`) would otherwise be handed to the owner with it.
fn refuse_hard_links(target: &OwnedFd, shown: &str) -> Result<(), Refusal> {
    let md = nix::sys::stat::fstat(target).map_err(|e| Refusal {
        kind: ErrorKind::Failed,
        message: format!("{shown}: {e}"),
    })?;
    if md.st_mode & libc::S_IFMT != libc::S_IFDIR && md.st_nlink > 1 {
        return Err(Refusal::refused(format!(
            "{shown} has {} hard links: refused (banger never makes hard links; remove the extra names)",
            md.st_nlink
        )));
    }
    Ok(())
}

/// Like [`chown_beneath`] for the directory `dir/rel` and everything in it.
/// Each level is opened from its parent's fd with `O_NOFOLLOW` and listed
/// through that fd, so nothing outside the tree can be reached, even if
/// the owner swaps entries for symlinks meanwhile.
pub(crate) fn chown_tree_beneath(
    dir: &Path,
    rel: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), Refusal> {
    let shown = dir.join(rel).display().to_string();
    let root = open_beneath(dir, rel, true)?;
    chown_tree_fd(root, uid, gid, &shown)
}

fn chown_tree_fd(fd: OwnedFd, uid: u32, gid: u32, shown: &str) -> Result<(), Refusal> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    fchown_fd(&fd, uid, gid, shown)?;
    let failed = |what: String| Refusal {
        kind: ErrorKind::Failed,
        message: what,
    };
    // The fd's own /proc link names exactly this directory.
    let listing = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let entries =
        std::fs::read_dir(&listing).map_err(|e| failed(format!("listing {shown}: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| failed(format!("listing {shown}: {e}")))?;
        let name = entry.file_name();
        let child_shown = format!("{shown}/{}", name.to_string_lossy());
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&fd, name.as_os_str(), flags, Mode::empty()) {
            Ok(sub) => chown_tree_fd(sub, uid, gid, &child_shown)?,
            // Not a directory (or a symlink): change the entry itself,
            // through an fd of exactly the inode that was checked.
            Err(nix::Error::ENOTDIR | nix::Error::ELOOP) => {
                let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let entry = openat(&fd, name.as_os_str(), flags, Mode::empty())
                    .map_err(|e| failed(format!("opening {child_shown}: {e}")))?;
                refuse_hard_links(&entry, &child_shown)?;
                fchown_fd(&entry, uid, gid, &child_shown)?;
            }
            Err(e) => return Err(failed(format!("opening {child_shown}: {e}"))),
        }
    }
    Ok(())
}

/// Opens `dir/rel` one plain name at a time with `O_NOFOLLOW`; the last
/// one as a listable directory when `listable`, else as an `O_PATH` fd.
fn open_beneath(dir: &Path, rel: &Path, listable: bool) -> Result<OwnedFd, Refusal> {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::Mode;
    use std::path::Component;
    let shown = dir.join(rel).display().to_string();
    let refused = |e: nix::Error| {
        if matches!(e, nix::Error::ELOOP | nix::Error::ENOTDIR) {
            Refusal::refused(format!(
                "{shown}: goes through a symlink or a non-directory: refused"
            ))
        } else {
            Refusal {
                kind: ErrorKind::Failed,
                message: format!("{shown}: {e}"),
            }
        }
    };
    let names: Vec<&std::ffi::OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(Refusal::refused(format!(
                "{shown}: only plain names below {} are allowed",
                dir.display()
            ))),
        })
        .collect::<Result<_, _>>()?;
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let last_flags = if listable {
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
    } else {
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
    };
    let mut target = open(
        dir,
        if names.is_empty() {
            last_flags
        } else {
            dir_flags
        },
        Mode::empty(),
    )
    .map_err(refused)?;
    for (i, name) in names.iter().enumerate() {
        let flags = if i + 1 == names.len() {
            last_flags
        } else {
            dir_flags
        };
        target = openat(&target, *name, flags, Mode::empty()).map_err(refused)?;
    }
    // With O_PATH | O_NOFOLLOW a final symlink is opened, not followed:
    // changing even the link itself is not what the caller asked for.
    let md = nix::sys::stat::fstat(&target).map_err(refused)?;
    if md.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(Refusal::refused(format!("{shown} is a symlink: refused")));
    }
    Ok(target)
}

fn fchown_fd(target: &OwnedFd, uid: u32, gid: u32, shown: &str) -> Result<(), Refusal> {
    // SAFETY: fchownat on an fd we own with an empty path and AT_EMPTY_PATH
    // changes that very inode; no pointers outlive the call.
    let rc = unsafe {
        libc::fchownat(
            target.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(Refusal {
            kind: ErrorKind::Failed,
            message: format!("chown {shown}: {}", std::io::Error::last_os_error()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::policy;
    use banger_net::host::{HostNetError, TapInfo};
    use banger_net::link::BridgeChange;
    use banger_net::{IfName, Subnet, TapName};
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;

    /// Records what reached the host; the test double of the real netlink.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Recorder {
        fn log(&self, s: String) -> Result<(), HostNetError> {
            self.0.lock().expect("lock").push(s);
            Ok(())
        }
        fn calls(&self) -> Vec<String> {
            self.0.lock().expect("lock").clone()
        }
    }

    #[async_trait::async_trait]
    impl HostNet for Recorder {
        async fn ensure_bridge(&self, b: &BridgeSpec) -> Result<BridgeChange, HostNetError> {
            self.log(format!("ensure_bridge {}", b.name))?;
            Ok(BridgeChange::default())
        }
        async fn bridge_index(&self, b: &IfName) -> Result<Option<u32>, HostNetError> {
            self.log(format!("bridge_index {b}"))?;
            Ok(Some(7))
        }
        async fn create_tap(&self, t: &TapName, uid: u32, b: &IfName) -> Result<(), HostNetError> {
            self.log(format!("create_tap {t} {uid} {b}"))
        }
        async fn delete_tap(&self, t: &TapName) -> Result<(), HostNetError> {
            self.log(format!("delete_tap {t}"))
        }
        async fn list_taps(&self) -> Result<Vec<TapInfo>, HostNetError> {
            Ok(vec![])
        }
        async fn nat_enable(&self, _: &Subnet, ip: Ipv4Addr) -> Result<(), HostNetError> {
            self.log(format!("nat_enable {ip}"))
        }
        async fn nat_disable(&self, _: &Subnet, ip: Ipv4Addr) -> Result<(), HostNetError> {
            self.log(format!("nat_disable {ip}"))
        }
        async fn nat_rebuild(
            &self,
            _: &Subnet,
            ips: &BTreeSet<Ipv4Addr>,
        ) -> Result<(), HostNetError> {
            self.log(format!("nat_rebuild {}", ips.len()))
        }
        async fn guard_rebuild(
            &self,
            _: &Subnet,
            bindings: &banger_net::guard::Bindings,
        ) -> Result<(), HostNetError> {
            self.log(format!("guard_rebuild {}", bindings.len()))
        }
        async fn firewall_ensure(
            &self,
            _: &Subnet,
            guard: Option<&banger_net::guard::Bindings>,
            nat: &BTreeSet<Ipv4Addr>,
        ) -> Result<banger_net::firewall::Repaired, HostNetError> {
            self.log(format!(
                "firewall_ensure {:?} {}",
                guard.map(|g| g.len()),
                nat.len()
            ))?;
            Ok(banger_net::firewall::Repaired {
                guard: true,
                nat: false,
            })
        }
        async fn guard_allow(
            &self,
            _: &Subnet,
            t: &TapName,
            ip: Ipv4Addr,
        ) -> Result<(), HostNetError> {
            self.log(format!("guard_allow {t} {ip}"))
        }
        async fn guard_forget(
            &self,
            _: &Subnet,
            t: &TapName,
            ip: Ipv4Addr,
        ) -> Result<(), HostNetError> {
            self.log(format!("guard_forget {t} {ip}"))
        }
        async fn resolved_wire(&self, b: &IfName, dns: SocketAddr) -> Result<(), HostNetError> {
            self.log(format!("wire {b} {dns}"))
        }
        async fn resolved_unwire(&self, b: &IfName) -> Result<(), HostNetError> {
            self.log(format!("unwire {b}"))
        }
    }

    fn kind(r: &Response) -> Option<ErrorKind> {
        match r {
            Response::Error { kind, .. } => Some(*kind),
            Response::Ok(_) => None,
        }
    }

    #[tokio::test]
    async fn lines_are_versioned_parsed_and_checked_before_anything_runs() {
        let t = tempfile::tempdir().expect("tmp");
        let rec = Arc::new(Recorder::default());
        let s = Server::new(policy(t.path()), rec.clone());
        let cases = [
            ("garbage", ErrorKind::Malformed),
            (r#"{"op":{"name":"hello"}}"#, ErrorKind::Version),
            (r#"{"version":1,"op":{"name":"hello"}}"#, ErrorKind::Version),
            (
                r#"{"version":"3","op":{"name":"hello"}}"#,
                ErrorKind::Version,
            ),
            (
                r#"{"version":5,"op":{"name":"exec","argv":["/bin/sh"]}}"#,
                ErrorKind::Malformed,
            ),
            // Forwarding is switched on by NAT alone; nothing switches it off.
            (
                r#"{"version":5,"op":{"name":"set_ip_forward","on":false}}"#,
                ErrorKind::Malformed,
            ),
            (
                r#"{"version":5,"op":{"name":"delete_tap","tap":"eth0"}}"#,
                ErrorKind::Refused,
            ),
            (
                r#"{"version":5,"op":{"name":"create_tap","tap":"bgtap1","bridge":"eth0"}}"#,
                ErrorKind::Refused,
            ),
        ];
        for (line, want) in cases {
            let r = s.handle_line(1000, line).await;
            assert_eq!(kind(&r), Some(want), "{line}: {r:?}");
        }
        let r = s
            .handle_line(1000, r#"{"version":99,"op":{"name":"hello"}}"#)
            .await;
        let Response::Error { message, .. } = r else {
            panic!("accepted")
        };
        assert!(message.contains("protocol version 99"), "{message}");
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());

        // Allowed: the TAP goes to the owner uid whatever the client says.
        let r = s
            .handle_line(
                1000,
                r#"{"version":5,"op":{"name":"create_tap","tap":"bgtap1","bridge":"banger0"}}"#,
            )
            .await;
        assert_eq!(r, Response::Ok(Reply::Done));
        let r = s
            .handle_line(
                1001,
                r#"{"version":5,"op":{"name":"delete_tap","tap":"bgtap1"}}"#,
            )
            .await;
        assert_eq!(kind(&r), Some(ErrorKind::Unauthorized));
        // The check of the tables answers what it made again.
        let r = s
            .handle_line(
                1000,
                r#"{"version":5,"op":{"name":"firewall_ensure","cidr":"172.16.0.0/24","bridge_ip":"172.16.0.1","guard":[{"tap":"bgtap1","ip":"172.16.0.2"}],"nat":[]}}"#,
            )
            .await;
        assert_eq!(
            r,
            Response::Ok(Reply::Repaired {
                guard: true,
                nat: false
            })
        );
        assert_eq!(
            rec.calls(),
            [
                "create_tap bgtap1 1000 banger0",
                "firewall_ensure Some(1) 0"
            ]
        );
    }

    /// The real path: a Unix socket, SO_PEERCRED, and a client whose uid
    /// is not the configured owner.
    #[tokio::test]
    async fn peer_credentials_decide_who_is_served() {
        let t = tempfile::tempdir().expect("tmp");
        let me = nix::unistd::getuid().as_raw();
        let sock = t.path().join("helper.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        // Owner is someone else: we (root or not) must be refused.
        let mut p = policy(t.path());
        p.owner_uid = me + 1;
        let s = Arc::new(Server::new(p, Arc::new(Recorder::default())));
        tokio::spawn(s.serve(listener, std::future::pending()));
        let client = banger_root_client::HelperClient::new(&sock);
        let e = client
            .call(crate::proto::Op::ListTaps)
            .await
            .expect_err("non-owner");
        assert!(e.to_string().contains("not the install owner"), "{e}");

        // Owner is us: served.
        let sock2 = t.path().join("helper2.sock");
        let listener = UnixListener::bind(&sock2).expect("bind");
        let mut p = policy(t.path());
        p.owner_uid = me;
        let s = Arc::new(Server::new(p, Arc::new(Recorder::default())));
        tokio::spawn(s.serve(listener, std::future::pending()));
        let client = banger_root_client::HelperClient::new(&sock2);
        let hello = client.hello().await.expect("hello");
        assert_eq!(hello.owner_uid, me);
        assert_eq!(hello.protocol, PROTOCOL_VERSION);
        // And peer_uid itself reports the real uid of a socketpair peer.
        let (a, _b) = UnixStream::pair().expect("pair");
        assert_eq!(peer_uid(&a).expect("cred"), me);
    }

    /// Not a test on its own: the client half of
    /// `a_process_of_another_uid_is_refused`, run in a child process
    /// started with another uid.
    #[test]
    fn peer_child() {
        let Some(sock) = std::env::var_os("BANGER_TEST_PEER_SOCKET") else {
            return;
        };
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
        s.write_all(b"{\"version\":5,\"op\":{\"name\":\"list_taps\"}}\n")
            .expect("write");
        let mut line = String::new();
        std::io::BufReader::new(s)
            .read_line(&mut line)
            .expect("read");
        print!("ANSWER {line}");
    }

    /// A process of another uid reaches the socket (its permissions let
    /// it) and is refused by SO_PEERCRED.
    #[tokio::test]
    async fn a_process_of_another_uid_is_refused() {
        use std::os::unix::process::CommandExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: switching uid needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let sock = t.path().join("helper.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        use std::os::unix::fs::PermissionsExt;
        for p in [t.path(), sock.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        let mut p = policy(t.path());
        p.owner_uid = 4242;
        let s = Arc::new(Server::new(p, Arc::new(Recorder::default())));
        tokio::spawn(s.serve(listener, std::future::pending()));
        let exe = std::env::current_exe().expect("test binary");
        let out = tokio::process::Command::from({
            let mut c = std::process::Command::new(exe);
            c.args([
                "--exact",
                "server::tests::peer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BANGER_TEST_PEER_SOCKET", &sock)
            .uid(4243)
            .gid(4243);
            c
        })
        .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
            .await
            .expect("child finishes")
            .expect("spawn child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer = stdout
            .lines()
            .find_map(|l| l.split_once("ANSWER ").map(|(_, a)| a))
            .unwrap_or_else(|| panic!("no answer in {stdout}"));
        let r: Response = serde_json::from_str(answer).expect("response");
        assert_eq!(kind(&r), Some(ErrorKind::Unauthorized), "{answer}");
        let Response::Error { message, .. } = r else {
            unreachable!()
        };
        assert!(
            message.contains("uid 4243 is not the install owner (uid 4242)"),
            "{message}"
        );
    }

    #[test]
    fn chown_follows_no_symlink_even_when_swapped_in_after_the_check() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown to another uid needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let state = t.path().join("state");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(state.join("vms/a")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("victim"), "x").expect("write");
        chown_beneath(&state, Path::new("vms/a"), 4242, 4243).expect("chown");
        let md = std::fs::metadata(state.join("vms/a")).expect("meta");
        assert_eq!((md.uid(), md.gid()), (4242, 4243));
        // The directory itself.
        chown_beneath(&state, Path::new(""), 4242, 4242).expect("chown dir");
        // Swapped for a symlink after the policy check: refused.
        std::fs::remove_dir(state.join("vms/a")).expect("rmdir");
        std::os::unix::fs::symlink(&outside, state.join("vms/a")).expect("symlink");
        let e = chown_beneath(&state, Path::new("vms/a/victim"), 4242, 4242).expect_err("link");
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        let e = chown_beneath(&state, Path::new("vms/a"), 4242, 4242).expect_err("link");
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        let e = chown_beneath(&state, Path::new("../outside/victim"), 4242, 4242).expect_err("..");
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        let md = std::fs::metadata(outside.join("victim")).expect("meta");
        assert_eq!(md.uid(), 0);
    }

    #[test]
    fn chown_tree_gives_the_whole_tree_and_nothing_outside() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown to another uid needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let state = t.path().join("state");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(state.join("images/default/sub")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("victim"), "x").expect("write");
        std::fs::write(state.join("images/default/rootfs.ext4"), "x").expect("write");
        std::fs::write(state.join("images/default/sub/f"), "x").expect("write");
        std::os::unix::fs::symlink(&outside, state.join("images/default/link")).expect("symlink");
        chown_tree_beneath(&state, Path::new("images/default"), 4242, 4243).expect("chown");
        for p in ["", "rootfs.ext4", "sub", "sub/f"] {
            let md = std::fs::metadata(state.join("images/default").join(p)).expect("meta");
            assert_eq!((md.uid(), md.gid()), (4242, 4243), "{p}");
        }
        let link = std::fs::symlink_metadata(state.join("images/default/link")).expect("meta");
        assert_eq!(link.uid(), 4242);
        for p in [
            outside.clone(),
            outside.join("victim"),
            state.join("images"),
        ] {
            assert_eq!(
                std::fs::metadata(&p).expect("meta").uid(),
                0,
                "{}",
                p.display()
            );
        }
        // The tree's root itself may not be a symlink.
        std::os::unix::fs::symlink(&outside, state.join("images/evil")).expect("symlink");
        let e = chown_tree_beneath(&state, Path::new("images/evil"), 4242, 4242).expect_err("link");
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        assert_eq!(std::fs::metadata(&outside).expect("meta").uid(), 0);
        // A hard link to a file elsewhere on the file system, in the tree.
        std::fs::create_dir_all(state.join("images/hl")).expect("mkdir");
        std::fs::hard_link(outside.join("victim"), state.join("images/hl/shadow")).expect("link");
        let e = chown_tree_beneath(&state, Path::new("images/hl"), 4242, 4242).expect_err("hl");
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        assert!(e.message.contains("hard links"), "{e}");
        assert_eq!(
            std::fs::metadata(outside.join("victim"))
                .expect("meta")
                .uid(),
            0
        );
    }

    #[tokio::test]
    async fn chown_refuses_a_hard_link_to_a_file_outside() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown to another uid needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let state = t.path().join("state");
        std::fs::create_dir_all(state.join("vms/a")).expect("mkdir");
        // Plays /etc/shadow: root's, on the same file system.
        let victim = t.path().join("shadow");
        std::fs::write(&victim, "root:x").expect("write");
        std::fs::hard_link(&victim, state.join("vms/a/console.log")).expect("link");
        let e = chown_beneath(&state, Path::new("vms/a/console.log"), 4242, 4242)
            .expect_err("a hard link");
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        assert!(e.message.contains("2 hard links"), "{e}");
        assert_eq!(std::fs::metadata(&victim).expect("meta").uid(), 0);
        // Through the whole request path too, and a plain file still works.
        let s = Server::new(policy(&state), Arc::new(Recorder::default()));
        let line = |p: &Path| {
            format!(
                r#"{{"version":5,"op":{{"name":"chown_to_owner","path":"{}"}}}}"#,
                p.display()
            )
        };
        let r = s
            .handle_line(1000, &line(&state.join("vms/a/console.log")))
            .await;
        assert_eq!(kind(&r), Some(ErrorKind::Refused), "{r:?}");
        assert_eq!(std::fs::metadata(&victim).expect("meta").uid(), 0);
        std::fs::remove_file(state.join("vms/a/console.log")).expect("rm");
        std::fs::write(state.join("vms/a/console.log"), "x").expect("write");
        let r = s
            .handle_line(1000, &line(&state.join("vms/a/console.log")))
            .await;
        assert_eq!(r, Response::Ok(Reply::Done));
    }

    /// A staged build as `build_debian` leaves it: image `img`, kernel `k`.
    fn staged_build(staging: &Staging) -> banger_image::BuiltImage {
        let dir = staging.images.join("img");
        let kdir = staging.kernels.join("k");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::create_dir_all(&kdir).expect("mkdir");
        for f in [dir.join("rootfs.ext4"), dir.join("work-seed.ext4")] {
            std::fs::write(f, "fs").expect("write");
        }
        for f in [kdir.join("vmlinuz"), kdir.join("initrd.img")] {
            std::fs::write(f, "k").expect("write");
        }
        banger_image::BuiltImage {
            rootfs: dir.join("rootfs.ext4"),
            work_seed: dir.join("work-seed.ext4"),
            dir,
            size_bytes: 2,
            kernel_name: "k".into(),
            kernel: kdir.join("vmlinuz"),
            initrd: kdir.join("initrd.img"),
            vmlinux: None,
            kernel_release: "6.1".into(),
            already_existed: false,
        }
    }

    #[test]
    fn builds_are_staged_in_root_s_dir_and_moved_into_the_owner_s_stores() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown to another uid needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let state = t.path().join("state");
        std::fs::create_dir_all(&state).expect("mkdir");
        let state = std::fs::canonicalize(&state).expect("canonical");
        let store = ImageStore {
            images_dir: state.join("images"),
            kernels_dir: state.join("kernels"),
            staging_dir: t.path().join("root/build"),
            mirror: None,
            agent_binary: PathBuf::from("/nonexistent"),
        };
        let s = Server::new(policy(&state), Arc::new(Recorder::default()));
        let staging = Staging::prepare(&store.staging_dir).expect("staging");
        let md = std::fs::metadata(&store.staging_dir).expect("meta");
        assert_eq!((md.uid(), md.mode() & 0o777), (0, 0o700));

        // Both stores missing: created for the owner, image and kernel moved.
        let built = s
            .hand_over(&staging, &store, staged_build(&staging))
            .expect("hand over");
        assert_eq!(built.rootfs, state.join("images/img/rootfs.ext4"));
        assert_eq!(built.initrd, state.join("kernels/k/initrd.img"));
        for p in [
            &store.images_dir,
            &built.dir,
            &built.rootfs,
            &built.work_seed,
            &built.kernel,
        ] {
            let md = std::fs::metadata(p).expect("moved");
            assert_eq!((md.uid(), md.gid()), (1000, 1000), "{}", p.display());
        }
        assert!(!staging.images.join("img").exists());
        assert!(!staging.kernels.join("k").exists());

        // The image exists now: refused, the owner's copy untouched, the
        // staged one removed. (The kernel alone would have been kept.)
        let e = s
            .hand_over(&staging, &store, staged_build(&staging))
            .expect_err("exists");
        assert!(e.message.contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&built.rootfs).expect("kept"), b"fs");
        assert!(!staging.images.join("img").exists());

        // The owner swapped its image store for a symlink: nothing is
        // written where it points.
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        std::fs::rename(&store.images_dir, state.join("old-images")).expect("mv");
        std::os::unix::fs::symlink(&elsewhere, &store.images_dir).expect("symlink");
        let e = s
            .hand_over(&staging, &store, staged_build(&staging))
            .expect_err("symlink");
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).expect("ls").count(), 0);
        assert!(!staging.images.join("img").exists());

        // A staging directory that is a symlink is refused.
        let link = t.path().join("link-build");
        std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
        assert!(Staging::prepare(&link).is_err());
    }
}
