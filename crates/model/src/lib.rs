//! Domain types shared by every banger component. Pure data and validation;
//! nothing here touches the file system, the network or a process.

#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod limits;
mod line;
mod name;
mod size;
mod spec;
mod template;
mod vm;

pub use line::{MAX_LINE, PartialLine};
pub use name::{NameError, VM_NAME_MAX_LEN, VM_NAME_PATTERN, VmName, generate_name};
pub use size::{ByteSize, SizeError};
pub use spec::{Provenance, SpecValue, VmSpec};
pub use template::{
    FileFp, HostFp, NicKind, StartInfo, StartKind, TEMPLATE_FORMAT, TemplateKey, TemplateRecord,
    TemplateShape, TemplateState, WarmMode, WarmSetting,
};
pub use vm::{ImageRecord, InitramfsMode, KernelRecord, VmBackend, VmId, VmRecord, VmState};
