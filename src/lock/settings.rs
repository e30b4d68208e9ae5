//! The reboot coordinator's settings, typed.
//!
//! The configuration loader reads the `reboot_*`, `drain_timeout` and
//! `stale_after` keys, checks them once and builds this
//! ([`crate::config::Config::reboot_settings`]); the coordinator and the
//! stale-holder sweep only read it. It lives here, with what it configures,
//! so the lock depends on no loader.

use std::path::PathBuf;
use std::time::Duration;

use super::step::Strategy;
use super::window::Window;

/// The reboot coordinator's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootSettings {
    /// What to do when a reboot is needed.
    pub strategy: Strategy,
    /// The lock group.
    pub group: String,
    /// When reboots may start (`None`: any time).
    pub window: Option<Window>,
    /// How long the drain may take.
    pub drain_timeout: Duration,
    /// How long a reboot may take.
    pub reboot_timeout: Duration,
    /// When an absent holder's slot is freed (`None`: never).
    pub stale_after: Option<Duration>,
    /// Where this boot's id is read.
    pub boot_id_file: PathBuf,
}
