pub mod bench;
pub mod daemon;
pub mod doctor;
pub mod image;
pub mod kernel;
pub mod ssh_config;
pub mod transfer;
pub mod vm;
