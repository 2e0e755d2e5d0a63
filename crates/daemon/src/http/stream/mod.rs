//! Streaming responses of the HTTP front end: NDJSON operations (their
//! events, their cancellation when the client goes away) and WebSocket
//! upgrades to a running VM's agent.

use super::Shared;
use crate::{Daemon, DaemonError};
use axum::body::Body;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use banger_api::{ApiError, ProgressSink};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

pub(crate) mod exec;
pub(crate) mod files;
pub(crate) mod progress;
pub(crate) mod session_socket;

/// Runs `op` as a streamed operation: what it reports to its sink goes out
/// as NDJSON events (see [`progress::sink`]), its result ends the stream as `done(..)` or
/// `error(..)`, and its token is cancelled when the client goes away or the
/// daemon shuts down.
pub(crate) fn operation<E, T, Er, F, Fut>(
    d: Shared,
    done: fn(T) -> E,
    error: fn(ApiError) -> E,
    op: F,
) -> Response
where
    E: progress::ProgressEvents + Serialize,
    T: 'static,
    Er: Into<DaemonError>,
    F: FnOnce(Shared, ProgressSink, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Er>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = d.shutdown.child_token();
    let guard = cancel.clone().drop_guard();
    tokio::spawn(async move {
        let ev = match op(d, progress::sink(&tx), cancel).await {
            Ok(v) => done(v),
            Err(e) => {
                let e: DaemonError = e.into();
                tracing::warn!(error = %e, "streamed operation failed");
                error(e.to_api())
            }
        };
        let _ = tx.send(ev);
    });
    ndjson(rx, guard)
}

/// Streams events as NDJSON. `guard` lives as long as the response body:
/// when the client disconnects, the body is dropped and the guard cancels
/// the operation behind it. A blank line every second keeps that detection
/// prompt even while the operation has nothing to say (clients skip them).
pub(crate) fn ndjson<E: Serialize + Send + 'static>(
    rx: mpsc::UnboundedReceiver<E>,
    guard: DropGuard,
) -> Response {
    let tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let stream =
        futures::stream::unfold((rx, guard, tick), |(mut rx, guard, mut tick)| async move {
            let line = tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                        line.push(b'\n');
                        line
                    }
                    None => {
                        // The operation finished: nothing left to cancel.
                        guard.disarm();
                        return None;
                    }
                },
                _ = tick.tick() => b"\n".to_vec(),
            };
            Some((Ok::<_, std::convert::Infallible>(line), (rx, guard, tick)))
        });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Answers a WebSocket upgrade for `vm` with `serve` on its agent, or with
/// the error that says why the VM's agent cannot be reached.
pub(crate) fn upgrade_to_agent<F, Fut>(
    d: &Daemon,
    vm: &str,
    ws: WebSocketUpgrade,
    serve: F,
) -> Response
where
    F: FnOnce(banger_agent_proto::client::AgentClient, WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match d.running_agent(vm) {
        Ok((_, agent)) => ws
            .on_upgrade(move |socket| serve(agent, socket))
            .into_response(),
        Err(e) => crate::DaemonError::from(e).into_response(),
    }
}

/// A response whose body is `stream`'s bytes as they come, as
/// `content_type`.
pub(crate) fn bytes<S>(content_type: &'static str, stream: S) -> Response
where
    S: futures::Stream<Item = Vec<u8>> + Send + 'static,
{
    use futures::StreamExt;
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(
            stream.map(Ok::<_, std::convert::Infallible>),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
