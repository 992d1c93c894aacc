//! Exit codes, from sysexits(3), so systemd units and scripts can tell failures apart.

use std::process::ExitCode;

/// Clean stop.
pub const OK: u8 = 0;
/// Anything not covered below.
pub const FAILURE: u8 = 1;
/// Bad command line.
pub const USAGE: u8 = 64;
/// The inbox's database is corrupt (EX_DATAERR): restarting will not help, an operator
/// must move the file aside, hence `RestartPreventExitStatus=65` too.
pub const DATAERR: u8 = 65;
/// The cluster has no room for this member (EX_UNAVAILABLE): `cluster.max_members` or
/// Slack's sockets per app are taken. Restarting in a loop would not make room, hence
/// `RestartPreventExitStatus=69` too.
pub const UNAVAILABLE: u8 = 69;
/// Another instance holds the app (EX_TEMPFAIL): try again later.
pub const TEMPFAIL: u8 = 75;
/// Bad configuration or a permanent Slack error (EX_CONFIG): restarting will not help,
/// hence `RestartPreventExitStatus=78` in the unit.
pub const CONFIG: u8 = 78;

pub fn code(value: u8) -> ExitCode {
    ExitCode::from(value)
}
