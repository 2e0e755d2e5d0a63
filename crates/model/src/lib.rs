//! Domain types shared by every banger component. Pure data and validation;
//! nothing here touches the file system, the network or a process.

mod name;
mod size;
mod spec;
mod vm;

pub use name::{NameError, VmName, generate_name};
pub use size::{ByteSize, SizeError};
pub use spec::{Provenance, SpecValue, VmSpec};
pub use vm::{ImageRecord, InitramfsMode, KernelRecord, VmBackend, VmId, VmRecord, VmState};
