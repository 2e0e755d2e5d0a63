pub mod bench;
pub mod daemon;
pub mod doctor;
pub mod image;
pub mod vm;
pub mod vm_ports;
