//! Supervised guest sessions, run by a running VM's agent: list, start,
//! stop, their logs, and the checks before an attach.

use crate::vm::AgentError;
use crate::{Daemon, ErrorKind};
use banger_agent_proto::client::{AgentClient, ClientError, ExecEvent, ExecSession};
use banger_agent_proto::{OutputStream, SessionInfo, SessionSpec, StdinMode, TtySize};
use banger_model::{VmName, VmRecord};
use futures::Stream;

/// A live session to attach to, and what the attach socket needs.
pub(crate) struct Attach {
    pub(crate) vm: VmRecord,
    pub(crate) agent: AgentClient,
    pub(crate) session: SessionInfo,
}

impl Daemon {
    /// Sessions of a running VM, running and ended.
    pub(crate) async fn list_sessions(&self, vm: &str) -> Result<Vec<SessionInfo>, AgentError> {
        let (_, agent) = self.running_agent(vm)?;
        Ok(agent.session_list().await?)
    }

    /// Starts a supervised session in a running VM.
    pub(crate) async fn start_session(
        &self,
        vm: &str,
        spec: SessionSpec,
    ) -> Result<SessionInfo, AgentError> {
        let (_, agent) = self.running_agent(vm)?;
        Ok(agent.session_start(spec).await?)
    }

    /// Ends a session of a running VM (SIGTERM, SIGKILL after 10 s) and
    /// forgets it.
    pub(crate) async fn stop_session(
        &self,
        vm: &str,
        name: &str,
    ) -> Result<SessionInfo, AgentError> {
        let (_, agent) = self.running_agent(vm)?;
        Ok(agent.session_stop(name).await?)
    }

    /// A session's ring logs (one stream, or stdout's then stderr's) and,
    /// with `follow`, its live output until it ends. An unknown session is
    /// an error here, before any byte.
    pub(crate) async fn session_log_stream(
        &self,
        vm: &str,
        name: &str,
        stream: Option<OutputStream>,
        follow: bool,
    ) -> Result<impl Stream<Item = Vec<u8>> + Send + 'static, AgentError> {
        use futures::StreamExt;
        let (_, agent) = self.running_agent(vm)?;
        let mut logs = agent.session_logs(name, stream, follow)?;
        // The first event tells an unknown session from an empty log.
        let first = next_bytes(&mut logs).await?;
        let head = futures::stream::iter(first);
        let rest = futures::stream::unfold(logs, |mut logs| async move {
            match next_bytes(&mut logs).await {
                Ok(Some(data)) => Some((data, logs)),
                _ => None,
            }
        });
        Ok(head.chain(rest))
    }

    /// The checks before attaching to session `name` of `vm`: the VM runs
    /// and the session is live. For a tty session and a given `size`, its
    /// terminal is resized first.
    pub(crate) async fn attach_session(
        &self,
        vm: &str,
        name: &str,
        size: Option<TtySize>,
    ) -> Result<Attach, SessionError> {
        let (rec, agent) = self.running_agent(vm)?;
        let all = agent.session_list().await.map_err(AgentError::from)?;
        let Some(info) = all.into_iter().find(|s| s.name == name) else {
            return Err(SessionError::NoSession {
                vm: rec.name,
                name: name.to_string(),
            });
        };
        if info.status.is_some() {
            return Err(SessionError::Ended {
                name: name.to_string(),
            });
        }
        if let Some(size) = size
            && info.stdin == StdinMode::Tty
        {
            // A short attach of its own carries the resize.
            let s = agent.session_attach(name).map_err(AgentError::from)?;
            s.resize(size).map_err(AgentError::from)?;
            s.detach().map_err(AgentError::from)?;
        }
        Ok(Attach {
            vm: rec,
            agent,
            session: info,
        })
    }
}

/// Why a session cannot be attached to.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The VM is not running, its agent is unreachable or refused.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The VM has no session of this name.
    #[error("VM {vm} has no session named {name:?}: `banger vm session list {vm}` shows them")]
    NoSession { vm: VmName, name: String },
    /// The session has ended: there is nothing to attach to.
    #[error("session {name:?} has ended: `banger vm session logs` shows its output")]
    Ended { name: String },
}

impl SessionError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Agent(e) => e.kind(),
            SessionError::NoSession { .. } => ErrorKind::NotFound,
            SessionError::Ended { .. } => ErrorKind::Conflict,
        }
    }
}

/// The next output of a logs/attach stream; `None` at its end.
async fn next_bytes(s: &mut ExecSession) -> Result<Option<Vec<u8>>, ClientError> {
    match s.next_event().await? {
        Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d)) => Ok(Some(d)),
        Some(ExecEvent::Error(m)) => Err(ClientError::Refused(m)),
        Some(ExecEvent::Exited(_) | ExecEvent::Session(_)) | None => Ok(None),
    }
}
