//! The Debian bookworm tree the machines boot from: made once with debootstrap, cached as
//! `target/e2e/rootfs-bookworm`, never modified afterwards (machines overlay it).
//!
//! A package the `.deb` depends on that the tree lacks (by its own dpkg status) makes a new
//! tree with it. Creation is serialised with a lock file and made atomic with a rename, so
//! an interrupted debootstrap never leaves a tree that looks finished.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Phase, host, work_dir};

pub const SUITE: &str = "bookworm";

/// What the brief's machines need: a systemd that boots, D-Bus, logind for `runuser`.
pub const BASE_PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus", "libpam-systemd"];

const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The cached tree, made with [`BASE_PACKAGES`] and `extra` (package names) when it is
/// missing or lacks one of them.
pub async fn ensure(extra: &[String]) -> PathBuf {
    let dir = work_dir();
    let rootfs = dir.join(format!("rootfs-{SUITE}"));
    let wanted: BTreeSet<String> = BASE_PACKAGES
        .iter()
        .map(|p| p.to_string())
        .chain(extra.iter().cloned())
        .collect();

    let lock_path = dir.join("rootfs.lock");
    let _lock = tokio::task::spawn_blocking(move || {
        let file = File::create(&lock_path).expect("create target/e2e/rootfs.lock");
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lock target/e2e/rootfs.lock")
    })
    .await
    .unwrap();

    let installed = installed_packages(&rootfs);
    if rootfs.join("usr/lib/systemd/systemd").exists() && wanted.is_subset(&installed) {
        return rootfs;
    }

    let packages = wanted;
    let mirror = mirror();
    let fresh = dir.join(format!("rootfs-{SUITE}.new"));
    remove_tree(&fresh).await;
    let include = format!(
        "--include={}",
        packages.iter().cloned().collect::<Vec<_>>().join(",")
    );
    eprintln!(
        "e2e: making the {SUITE} rootfs with debootstrap from {mirror} ({include}); \
         cached in {} for the next runs",
        rootfs.display()
    );
    let phase = Phase::start(format!("debootstrap {SUITE} rootfs (once, then cached)"));
    let output = host(
        "debootstrap",
        &[
            "--variant=minbase",
            &include,
            SUITE,
            fresh.to_str().unwrap(),
            &mirror,
        ],
        DEBOOTSTRAP_TIMEOUT,
    )
    .await;
    if !output.status.success() {
        let log =
            std::fs::read_to_string(fresh.join("debootstrap/debootstrap.log")).unwrap_or_default();
        panic!(
            "debootstrap failed ({}):\n{}{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            tail(&log, 40)
        );
    }
    phase.done();
    // Trim what no test needs: the downloaded archives.
    let _ = std::fs::remove_dir_all(fresh.join("var/cache/apt/archives"));
    let _ = std::fs::create_dir_all(fresh.join("var/cache/apt/archives/partial"));

    remove_tree(&rootfs).await;
    std::fs::rename(&fresh, &rootfs).expect("move the new rootfs into place");
    rootfs
}

/// The packages installed in a tree, from its `var/lib/dpkg/status`.
fn installed_packages(rootfs: &Path) -> BTreeSet<String> {
    let status = std::fs::read_to_string(rootfs.join("var/lib/dpkg/status")).unwrap_or_default();
    status
        .split("\n\n")
        .filter(|stanza| stanza.lines().any(|l| l == "Status: install ok installed"))
        .filter_map(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Package: ")))
        .map(str::to_owned)
        .collect()
}

async fn remove_tree(path: &Path) {
    if path.exists() {
        let output = host(
            "rm",
            &["-rf", "--one-file-system", path.to_str().unwrap()],
            Duration::from_secs(120),
        )
        .await;
        assert!(output.status.success(), "cannot remove {}", path.display());
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `FLOWCOACH_E2E_MIRROR`, else the first Debian (non-security) mirror of this machine's
/// APT sources; panics saying so when there is none: the tests name no mirror of their own.
pub fn mirror() -> String {
    if let Ok(mirror) = std::env::var("FLOWCOACH_E2E_MIRROR")
        && !mirror.is_empty()
    {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .find_map(|text| debian_mirror_in(&text))
        .unwrap_or_else(|| {
            panic!(
                "no Debian mirror for {SUITE} in /etc/apt/sources.list or /etc/apt/sources.list.d/: \
                 configure APT, or set FLOWCOACH_E2E_MIRROR to the mirror debootstrap should use"
            )
        })
}

/// A mirror serving `SUITE` in one sources file, one-line (`deb URL suite …`) or deb822.
fn debian_mirror_in(text: &str) -> Option<String> {
    let usable =
        |uri: &str| uri.starts_with("http") && uri.contains("debian") && !uri.contains("security");
    for line in text.lines() {
        let words: Vec<&str> = line
            .split_whitespace()
            .filter(|w| !w.starts_with('['))
            .collect();
        if words.len() >= 3 && words[0] == "deb" && words[2] == SUITE && usable(words[1]) {
            return Some(words[1].to_owned());
        }
    }
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        let types_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let suite = field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == SUITE));
        if let (true, true, Some(uris)) = (types_deb, suite, field("URIs"))
            && let Some(uri) = uris.split_whitespace().find(|u| usable(u))
        {
            return Some(uri.to_owned());
        }
    }
    None
}
