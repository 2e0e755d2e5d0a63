//! Why a network operation failed or was refused.

use crate::ErrorKind;
use crate::error::{Chain, store_kind};
use crate::steps::StepError;
use crate::vm::AgentError;
use banger_agent_proto::client::ClientError;
use banger_model::VmName;
use banger_net::{AllocError, HostNetError, SettingsError};
use banger_store::StoreError;

/// A failure of the daemon's networking: a VM's address, the host side
/// of its network, its NAT rules, its ports.
///
/// Each message carries its causes (as anyhow's `{:#}` shows them), and no
/// variant but [`NetError::Agent`] has a `source()`: a boot wraps these
/// errors in `anyhow` and prints them with `{:#}`, which would otherwise
/// say a cause twice.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No guest address is left in the bridge network.
    #[error("{0}")]
    NoFreeAddress(AllocError),
    /// config.toml's network settings are unusable.
    #[error("network settings in config.toml: {}", Chain(.0))]
    Settings(SettingsError),
    /// Networking was required but could not be set up: the reason.
    #[error("{0}")]
    Unavailable(String),
    /// The VM was recorded before networking existed.
    #[error("VM {name} has no address (made before networking existed): recreate it")]
    NoAddress { name: VmName },
    /// No port on 127.0.0.1 for a user-mode VM's ssh forward.
    #[error("finding a free port on 127.0.0.1: {0}")]
    LocalPort(std::io::Error),
    /// Attaching the VM's TAP or enabling its NAT failed (rolled back).
    #[error("{0}")]
    Setup(StepError),
    /// NAT rules need the bridge; `mode` is the daemon's networking.
    #[error("NAT needs bridge networking; this daemon uses {mode} networking (see banger doctor)")]
    NatNeedsBridge { mode: &'static str },
    /// Changing the NAT rules of a running VM failed.
    #[error("changing NAT of {name}: {}", Chain(.cause))]
    Nat { name: VmName, cause: HostNetError },
    /// The guest's address checks on the bridge could not be added (the
    /// boot is rolled back).
    #[error("letting the guest send as its own address on the bridge: {}", Chain(.0))]
    Guard(HostNetError),
    /// The guest's agent did not list its listening ports in time.
    #[error("the agent of {name} did not list its ports within {secs}s")]
    PortsTimeout { name: VmName, secs: u64 },
    /// The guest's agent failed to list its listening ports.
    #[error("listing ports of {name}: {cause}")]
    Ports { name: VmName, cause: ClientError },
    /// `vm ports` needs the VM running with its agent.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Networking starts after reconcile; asked before that.
    #[error("networking is not initialised yet")]
    NotInitialised,
    /// Reading or recording the VMs' network fields failed.
    #[error("{}", Chain(.0))]
    Store(StoreError),
}

impl NetError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use NetError as E;
        match self {
            E::NoFreeAddress(_) | E::NatNeedsBridge { .. } | E::NotInitialised => {
                ErrorKind::Conflict
            }
            E::NoAddress { .. } => ErrorKind::Conflict,
            E::Settings(_)
            | E::Unavailable(_)
            | E::LocalPort(_)
            | E::Setup(_)
            | E::Nat { .. }
            | E::Guard(_)
            | E::PortsTimeout { .. }
            | E::Ports { .. } => ErrorKind::Failed,
            E::Agent(e) => e.kind(),
            E::Store(e) => store_kind(e),
        }
    }
}

// By hand, not `#[from]`: that would make the cause a `source()` too.
impl From<StoreError> for NetError {
    fn from(e: StoreError) -> Self {
        NetError::Store(e)
    }
}

impl From<StepError> for NetError {
    fn from(e: StepError) -> Self {
        NetError::Setup(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a boot prints of a failed `net_up` (`{:#}` of an anyhow error)
    /// is what the anyhow chain it replaced printed.
    #[test]
    fn messages_carry_their_causes_once() {
        let io = || std::io::Error::other("no ports left");
        let e = anyhow::Error::from(NetError::LocalPort(io()));
        let was = anyhow::Error::from(io()).context("finding a free port on 127.0.0.1");
        assert_eq!(format!("{e:#}"), format!("{was:#}"));

        let store = || StoreError::CreateDir {
            path: "/x".into(),
            source: std::io::Error::other("disk full"),
        };
        let e = anyhow::Error::from(NetError::from(store()));
        assert_eq!(
            format!("{e:#}"),
            format!("{:#}", anyhow::Error::from(store()))
        );
        assert_eq!(format!("{e:#}"), "creating /x: disk full");

        let e = NetError::NatNeedsBridge { mode: "user" };
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "NAT needs bridge networking; this daemon uses user networking (see banger doctor)"
        );
        let e = NetError::NotInitialised;
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Conflict, "networking is not initialised yet")
        );
    }
}
