//! The progress of long operations, typed: the steps they report, the
//! [`Event`]s producers make, and the one [`ProgressSink`] they make them
//! through (which also throttles transfers, see [`Throttle`]).
//!
//! On the wire a step is its name, a plain string (`Progress.phase`), so
//! the API document and older clients are unchanged. Clients match the
//! variants instead of names; a name this version does not know decodes as
//! [`Step::Other`] and is shown as it came. Warnings are not a step: each
//! operation's event enum has its own `warning` variant.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod sink;
pub use sink::{Event, ProgressSink, Throttle};

/// Declares [`Step`] with each variant's wire name, in one table.
macro_rules! steps {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )*) => {
        /// A step of a long operation (VM create/start/wait, image work).
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum Step {
            $( $(#[$doc])* $variant, )*
            /// A step this version does not know, by its wire name.
            Other(String),
        }

        impl Step {
            /// Every named step, in declaration order.
            pub const KNOWN: &'static [Step] = &[$(Step::$variant),*];

            /// The step's wire name.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Step::$variant => $name, )*
                    Step::Other(name) => name,
                }
            }

            /// The step named `name`, or [`Step::Other`].
            pub fn from_name(name: &str) -> Step {
                match name {
                    $( $name => Step::$variant, )*
                    other => Step::Other(other.to_string()),
                }
            }
        }
    };
}

steps! {
    /// How the VM starts: cold or warm, and why (always shown).
    Start => "start",
    /// An informational line that opens no phase.
    Note => "note",
    /// The guest answered (agent ready, or sshd up).
    Ready => "ready",
    /// Getting the VM's image (pull, build or check).
    Image => "image",
    Download => "download",
    /// Unpacking a downloaded bundle.
    Extract => "extract",
    /// Getting the kernel an image boots with.
    Kernel => "kernel",
    Catalog => "catalog",
    Oci => "oci",
    Check => "check",
    /// Writing a catalog bundle.
    Bundle => "bundle",
    /// The transient VM of an image derivation.
    Vm => "vm",
    Resolve => "resolve",
    /// The VM's directory.
    Dir => "dir",
    /// The VM's record in the store.
    Record => "record",
    /// The VM's disks.
    Disks => "disks",
    /// The VM's disks cloned from a warm-start template.
    CloneDisks => "clone-disks",
    /// The VM's ssh host key and authorized keys.
    Ssh => "ssh",
    /// `[[file_sync]]` into the work disk.
    Files => "files",
    /// Credential files into the work disk.
    Credentials => "credentials",
    Network => "network",
    Tap => "tap",
    Nat => "nat",
    /// The VMM starts the guest.
    Boot => "boot",
    /// Waiting for the guest agent's greeting.
    Agent => "agent",
    /// Waiting for the guest's init system to finish booting.
    System => "system",
    /// Waiting for sshd in the guest.
    Sshd => "sshd",
    /// The VMM loads a template's snapshot.
    Restore => "restore",
    /// The guest takes its own identity after a restore.
    Identity => "identity",
    /// Disks grown after a restore.
    Grow => "grow",
    /// A template's guest is sealed before its snapshot.
    Seal => "seal",
    Snapshot => "snapshot",
    Save => "save",
    Wait => "wait",
    Shutdown => "shutdown",
    Cleanup => "cleanup",
    Done => "done",
}

/// The phases a `vm run`/`vm create` user sees, each covering several
/// daemon steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepGroup {
    /// Directory, record, disks, keys and files.
    Create,
    /// Network, VMM, agent and readiness (or restore and identity).
    Boot,
}

impl StepGroup {
    /// The phase's name in `vm run`'s lines and timings.
    pub fn as_str(self) -> &'static str {
        match self {
            StepGroup::Create => "create",
            StepGroup::Boot => "boot",
        }
    }
}

impl Step {
    /// The user-facing phase this step belongs to, if it opens one.
    pub fn group(&self) -> Option<StepGroup> {
        use Step::*;
        match self {
            Dir | Record | Disks | Ssh | Files | CloneDisks => Some(StepGroup::Create),
            Network | Credentials | Boot | Agent | System | Sshd | Restore | Grow | Identity => {
                Some(StepGroup::Boot)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Step {
    fn from(name: &str) -> Self {
        Step::from_name(name)
    }
}

impl From<String> for Step {
    fn from(name: String) -> Self {
        match Step::from_name(&name) {
            Step::Other(_) => Step::Other(name),
            known => known,
        }
    }
}

impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Step::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_step_round_trips_by_its_name() {
        let mut names = std::collections::HashSet::new();
        for step in Step::KNOWN {
            assert!(names.insert(step.as_str()), "{step} named twice");
            let json = serde_json::to_string(step).expect("encode");
            assert_eq!(json, format!("\"{}\"", step.as_str()));
            let back: Step = serde_json::from_str(&json).expect("decode");
            assert_eq!(&back, step);
            assert!(!matches!(back, Step::Other(_)), "{step} decoded as Other");
        }
    }

    #[test]
    fn an_unknown_name_is_kept_as_it_came() {
        let step: Step = serde_json::from_str("\"defragment\"").expect("decode");
        assert_eq!(step, Step::Other("defragment".into()));
        assert_eq!(step.to_string(), "defragment");
        assert_eq!(
            serde_json::to_string(&step).expect("encode"),
            "\"defragment\""
        );
        assert_eq!(step.group(), None);
    }

    #[test]
    fn steps_fold_into_the_phases_users_see() {
        assert_eq!(Step::Disks.group(), Some(StepGroup::Create));
        assert_eq!(Step::CloneDisks.group(), Some(StepGroup::Create));
        assert_eq!(Step::Agent.group(), Some(StepGroup::Boot));
        assert_eq!(Step::Restore.group(), Some(StepGroup::Boot));
        assert_eq!(Step::Note.group(), None);
        assert_eq!(Step::Ready.group(), None);
        assert_eq!(Step::from("identity").group(), Some(StepGroup::Boot));
    }
}
