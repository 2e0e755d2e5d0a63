//! The daemon connection: see [`banger_client::connect`].

pub use banger_client::connect::*;
