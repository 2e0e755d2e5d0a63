use crate::ByteSize;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where an effective VM setting came from, highest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    /// A command-line flag or API field.
    Flag,
    /// `[vm_defaults]` in config.toml.
    Config,
    /// Derived from the host's CPUs and memory.
    Host,
    /// banger's built-in floor.
    Builtin,
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provenance::Flag => "flag",
            Provenance::Config => "config",
            Provenance::Host => "host",
            Provenance::Builtin => "builtin",
        })
    }
}

/// A value together with where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpecValue<T> {
    pub value: T,
    pub source: Provenance,
}

impl<T> SpecValue<T> {
    pub fn new(value: T, source: Provenance) -> Self {
        Self { value, source }
    }
}

/// The resources of one VM, each with its provenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmSpec {
    #[schema(value_type = SpecValueU32)]
    pub vcpu: SpecValue<u32>,
    #[schema(value_type = SpecValueU64)]
    pub memory_mib: SpecValue<u64>,
    /// Work disk size in bytes.
    #[schema(value_type = SpecValueU64)]
    pub disk_bytes: SpecValue<u64>,
}

/// OpenAPI stand-in for `SpecValue<u32>`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SpecValueU32 {
    value: u32,
    source: Provenance,
}

/// OpenAPI stand-in for `SpecValue<u64>`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SpecValueU64 {
    value: u64,
    source: Provenance,
}

impl VmSpec {
    /// The `spec:` line printed before a VM is created.
    pub fn summary(&self) -> String {
        format!(
            "spec: vcpu={} ({}), memory={} ({}), disk={} ({})",
            self.vcpu.value,
            self.vcpu.source,
            ByteSize::mib(self.memory_mib.value),
            self.memory_mib.source,
            ByteSize(self.disk_bytes.value),
            self.disk_bytes.source,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_sources() {
        let s = VmSpec {
            vcpu: SpecValue::new(2, Provenance::Host),
            memory_mib: SpecValue::new(2048, Provenance::Config),
            disk_bytes: SpecValue::new(ByteSize::gib(8).bytes(), Provenance::Builtin),
        };
        assert_eq!(
            s.summary(),
            "spec: vcpu=2 (host), memory=2G (config), disk=8G (builtin)"
        );
    }
}
