//! Where the workspace's binaries are: beside the running executable. Cargo puts test
//! executables in `target/<profile>/deps/` and binaries in `target/<profile>/`, so a test
//! looks one directory up; the development binary finds them in its own directory.

use std::path::PathBuf;

/// Overrides the directory the binaries are taken from.
pub const BIN_DIR_VARIABLE: &str = "FLOWCOACH_BIN_DIR";

/// The `flowcoach` daemon.
pub fn flowcoach() -> PathBuf {
    locate("flowcoach")
}

/// The `flowcoachctl` control client.
pub fn flowcoachctl() -> PathBuf {
    locate("flowcoachctl")
}

/// The binary `name` from [`BIN_DIR_VARIABLE`], else beside the running executable or one
/// directory up. Panics with what to build when it is in neither: a harness without the
/// daemon cannot do anything useful.
pub fn locate(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_VARIABLE).filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("the path of the running executable");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no {name} binary at {candidates:?}: build it first (cargo build --bins), or set {BIN_DIR_VARIABLE}"
            )
        })
}
