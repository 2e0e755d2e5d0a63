//! Configuration: `config.toml`, banger's directories, and the effective
//! sizing of new VMs with where each value came from.

mod defaults;
mod file;
pub mod install;
mod paths;
pub mod sd;
mod values;

pub use defaults::{
    BUILTIN_DISK_BYTES, BUILTIN_MEMORY_MIB, BUILTIN_VCPU, HOST_MEMORY_CAP_MIB, HOST_VCPU_CAP,
    HostResources, apply_flags, effective_defaults, parse_meminfo_mib,
};
pub use file::{
    Config, ConfigError, FileSync, LOG_LEVEL_ENV, MAX_VCPU, MIN_DISK_BYTES, MIN_MEMORY_MIB,
    VmDefaults,
};
pub use install::{InstallPaths, InstallRecord};
pub use paths::{Paths, PathsError, SOCKET_ENV, SYSTEM_ENV};
pub use values::{FileMode, Ipv4Cidr, LogLevel, NetworkMode, VmmChoice};
