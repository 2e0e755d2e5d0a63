//! The protocol loop over one connected stream.

use crate::exec::{self, ExecInput};
use banger_agent_proto::{Body, CONTROL, Frame, FrameCodec, Hello, PROTO_VERSION};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Open exec channels: where their stdin/signals go.
pub(crate) type Channels = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<ExecInput>>>>;

/// What the agent does on a shutdown request. Injected so tests do not
/// power off the machine running them.
pub type ShutdownFn = Arc<dyn Fn(bool) + Send + Sync>;

/// Serves the protocol on `stream` until it ends. Greets first. Processes
/// started on this stream are killed when it ends.
pub async fn serve<S>(stream: S, on_shutdown: ShutdownFn) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        let mut sink = FramedWrite::new(wr, FrameCodec);
        while let Some(f) = out_rx.recv().await {
            if sink.send(f).await.is_err() {
                break;
            }
        }
    });
    let _ = out.send(hello());

    let channels: Channels = Arc::default();
    let mut frames = FramedRead::new(rd, FrameCodec);
    while let Some(next) = frames.next().await {
        let frame = match next {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                eprintln!("banger-agent: skipping malformed frame: {e}");
                continue;
            }
            Err(e) => {
                eprintln!("banger-agent: stream error: {e}");
                break;
            }
        };
        handle(frame, &out, &channels, &on_shutdown);
    }
    // Stream gone: end every process it started (dropping their inputs).
    let pending: Vec<_> = channels.lock().map(|mut c| c.drain().collect()).unwrap_or_default();
    for (_, tx) in pending {
        let _ = tx.send(ExecInput::Signal(libc::SIGKILL));
    }
    drop(out);
    let _ = writer.await;
    Ok(())
}

fn hello() -> Frame {
    Frame::new(
        CONTROL,
        Body::Hello(Hello {
            proto_version: PROTO_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: uptime_ms(),
        }),
    )
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0)
}

fn handle(frame: Frame, out: &mpsc::UnboundedSender<Frame>, channels: &Channels, on_shutdown: &ShutdownFn) {
    let ch = frame.channel;
    let refuse = |msg: String| {
        let _ = out.send(Frame::new(ch, Body::Error(msg)));
    };
    if ch == CONTROL {
        match frame.body {
            Body::Ping => {
                let _ = out.send(hello());
            }
            Body::Shutdown { reboot } => on_shutdown(reboot),
            other => eprintln!("banger-agent: ignoring control frame {other:?}"),
        }
        return;
    }
    let input = match frame.body {
        Body::Exec(req) => {
            let mut map = match channels.lock() {
                Ok(m) => m,
                Err(_) => return refuse("agent state poisoned".into()),
            };
            if map.contains_key(&ch) {
                return refuse(format!("channel {ch} is already in use"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            map.insert(ch, tx);
            tokio::spawn(exec::run(ch, req, rx, out.clone(), channels.clone()));
            return;
        }
        Body::Stdin(data) => ExecInput::Stdin(data),
        Body::StdinEof => ExecInput::StdinEof,
        Body::Signal(sig) => ExecInput::Signal(sig),
        other => return refuse(format!("unexpected request {other:?}")),
    };
    let tx = channels.lock().ok().and_then(|m| m.get(&ch).cloned());
    match tx {
        Some(tx) => {
            let _ = tx.send(input);
        }
        // Input for a process that already ended is not an error: it raced
        // with the exit. Anything else on an unknown channel is.
        None if matches!(input, ExecInput::Signal(_) | ExecInput::Stdin(_) | ExecInput::StdinEof) => {}
        None => refuse(format!("no process on channel {ch}")),
    }
}
