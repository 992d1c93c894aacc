//! Tests that need a tool outside the workspace (a Bolt example's packages, Prometheus):
//! they run when it is there; when it is not, they skip loudly, or fail when their variable
//! is `1` (as CI sets it), so CI can never pass them without running them.

use std::io::Write;

/// Whether `test` should run, given why its tool is `missing` (`None`: it is there). A
/// skip writes a `SKIPPED` line past the test runner's capture, so it shows.
pub fn runnable(test: &str, missing: Option<String>, mandatory_variable: &str) -> bool {
    let Some(why) = missing else {
        return true;
    };
    if std::env::var(mandatory_variable).is_ok_and(|v| v == "1") {
        panic!("{test}: {why} ({mandatory_variable}=1 makes this test mandatory)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why}; set {mandatory_variable}=1 to make it fail instead"
    );
    false
}
