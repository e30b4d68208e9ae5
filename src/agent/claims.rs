//! The claim check, under the names the agent's loop uses.
//!
//! The check itself is pure and lives beside placement in
//! [`crate::units::claim`], built on the same co-location rules; this module
//! only re-exports it.

pub use crate::units::claim::{Ruled, Wait, choose};
