//! Provisioning steps run in the transient VM through its agent.

use super::*;
use anyhow::Context;
use banger_agent_proto::ExecRequest;
use banger_agent_proto::client::{AgentClient, ExecEvent};
use banger_image::derive::{GuestStep, HostFile};
use banger_model::PartialLine;
use std::collections::VecDeque;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// Runs one provisioning step through the agent; its output goes to the
/// daemon log, and the last lines into the error when it fails.
pub(super) async fn run_step(
    agent: &AgentClient,
    step: &GuestStep,
    stdin: Option<&Path>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let input = match stdin {
        Some(p) => Some(
            tokio::fs::read(p)
                .await
                .with_context(|| format!("reading {}", p.display()))?,
        ),
        None => None,
    };
    let mut session = agent.exec(ExecRequest {
        argv: step.argv.clone(),
        env: vec![],
        cwd: Some("/".into()),
        stdin: input.is_some(),
        tty: None,
    })?;
    if let Some(data) = input {
        session.write_stdin(&data).await?;
        session.close_stdin()?;
    }
    let mut tail = Tail::default();
    let deadline = tokio::time::sleep(STEP_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        let ev = tokio::select! {
            ev = session.next_event() => ev?,
            _ = cancel.cancelled() => anyhow::bail!("cancelled"),
            _ = &mut deadline => anyhow::bail!(
                "it ran longer than {} minutes; last output:\n{}",
                STEP_TIMEOUT.as_secs() / 60,
                tail.text()
            ),
        };
        match ev {
            Some(ExecEvent::Stdout(d)) | Some(ExecEvent::Stderr(d)) => {
                for line in tail.push(&d) {
                    tracing::debug!(target: "image_build", step = step.name, "{line}");
                }
            }
            Some(ExecEvent::Exited(s)) if s.code == Some(0) => return Ok(()),
            Some(ExecEvent::Exited(s)) => anyhow::bail!(
                "it exited with status {}; last output:\n{}",
                s.code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| format!("signal {}", s.signal.unwrap_or(0))),
                tail.text()
            ),
            Some(ExecEvent::Error(m)) => anyhow::bail!("{m}"),
            // Only attach and logs channels end with a session record.
            Some(ExecEvent::Session(_)) | None => {
                anyhow::bail!("the guest agent ended the session without an exit status")
            }
        }
    }
}

/// Downloads host file `f` to `path` and checks its sha512.
pub(super) async fn fetch_verified(
    f: HostFile,
    path: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let (url, want) = f.source();
    Ok(banger_image::mise::fetch_sha512(url, want, path, cancel).await?)
}

/// The last lines of a process's output.
#[derive(Default)]
struct Tail {
    /// The unfinished line.
    partial: PartialLine,
    lines: VecDeque<String>,
}

impl Tail {
    /// Adds output; returns the lines it completed. Only `data` is
    /// scanned, never the unfinished line again.
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.partial.append(&rest[..i]);
            rest = &rest[i + 1..];
            let text = self.line();
            self.partial.clear();
            if text.is_empty() {
                continue;
            }
            if self.lines.len() == TAIL_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(text.clone());
            done.push(text);
        }
        self.partial.append(rest);
        done
    }

    /// The unfinished line as text, marked when its start was cut.
    fn line(&self) -> String {
        self.partial
            .text(|b| String::from_utf8_lossy(b).trim_end().to_string())
    }

    fn text(&self) -> String {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        let rest = self.line();
        let rest = rest.trim_start();
        if !rest.is_empty() {
            lines.push(rest.to_string());
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_model::MAX_LINE;

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut t = Tail::default();
        assert!(t.push(b"par").is_empty());
        assert_eq!(t.push(b"tial\nnext\r\n\n"), ["partial", "next"]);
        for i in 0..20 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"unterminated");
        let text = t.text();
        assert!(text.starts_with("line 8\n"), "{text}");
        assert!(text.ends_with("line 19\nunterminated"), "{text}");
    }

    #[test]
    fn tail_keeps_a_bounded_end_of_a_line_without_newline() {
        let mut t = Tail::default();
        t.push(b"before\n");
        // A MiB without a newline, as a hostile guest may print.
        for _ in 0..1024 {
            assert!(t.push(&[b'x'; 1024]).is_empty());
        }
        assert!(
            t.partial.bytes().len() <= MAX_LINE,
            "{}",
            t.partial.bytes().len()
        );
        let text = t.text();
        assert!(text.len() <= "before\n…".len() + MAX_LINE, "{}", text.len());
        assert!(text.starts_with("before\n…xxx"), "{}", &text[..20]);
        let done = t.push(b"yz\nnext\n");
        assert_eq!(done.len(), 2);
        assert!(done[0].starts_with('…') && done[0].ends_with("xxyz"));
        assert_eq!(done[0].len(), '…'.len_utf8() + MAX_LINE);
        assert_eq!(done[1], "next");
    }
}
