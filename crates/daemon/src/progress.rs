//! The one adapter from the leaf crates' typed progress (catalog pulls,
//! OCI pulls, Debian builds) to the [`ProgressSink`] every daemon
//! operation reports through.
//!
//! The leaf crates keep their own callback types: depending on
//! `banger-api` would link its HTTP client and OpenAPI machinery into
//! crates that know nothing of the daemon. Throttling happens in the sink,
//! so these callbacks hand on every update.

use banger_api::{ProgressSink, Step};
use std::sync::Arc;

/// A catalog pull's progress as transfers of `download` and `extract`.
pub(crate) fn catalog(sink: &ProgressSink) -> Arc<dyn Fn(banger_catalog::Progress) + Send + Sync> {
    let sink = sink.clone();
    Arc::new(move |p| match p {
        banger_catalog::Progress::Download { done, total } => {
            sink.transfer(Step::Download, done, total)
        }
        banger_catalog::Progress::Extract { done, total } => {
            sink.transfer(Step::Extract, done, total)
        }
    })
}

/// An OCI pull's progress: phases, a transfer per downloaded layer
/// (`layer N`, 1-based; cached layers move no bytes), notes; tool output
/// goes to the daemon's debug log only.
pub(crate) fn oci(sink: &ProgressSink) -> Arc<dyn Fn(banger_oci::PullProgress) + Send + Sync> {
    use banger_oci::PullProgress as P;
    let sink = sink.clone();
    Arc::new(move |p| match p {
        P::Resolved {
            digest,
            layers,
            total_bytes,
        } => sink.phase(
            Step::Resolve,
            format!("{digest}: {layers} layers, {total_bytes} bytes"),
        ),
        P::Layer {
            index,
            done,
            total,
            cached,
            ..
        } => {
            if !cached {
                sink.transfer(format!("layer {}", index + 1), done, total)
            }
        }
        P::Phase { name, message } => sink.phase(name, message),
        P::Line(l) => tracing::debug!(target: "oci_pull", "{l}"),
        P::Note(n) => sink.phase(Step::Note, n),
    })
}

/// A Debian build's progress: phases go to `sink`; a line of tool output
/// is handed back (it belongs in the build's log, not in front of people).
pub(crate) fn image_build(sink: &ProgressSink, p: banger_image::Progress) -> Option<String> {
    match p {
        banger_image::Progress::Phase { name, message } => {
            sink.phase(name, message);
            None
        }
        banger_image::Progress::Line(line) => Some(line),
    }
}
