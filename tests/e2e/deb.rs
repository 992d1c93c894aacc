//! The package under test: found under `target/debian/`, inspected with dpkg-deb, and
//! repacked with a higher version for the upgrade test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{host_ok, target_dir, work_dir};

const DPKG_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Deb {
    pub path: PathBuf,
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// `Depends` and `Pre-Depends`, package names only (the first of alternatives).
    pub depends: Vec<String>,
    /// The package's files, unpacked (`dpkg-deb -x`), to read its units.
    tree: tempfile::TempDir,
}

/// The package under test: [`find`]'s, copied once per test process (into
/// `target/e2e/debs/`), so that every test of a run installs the same file even if the
/// package is rebuilt meanwhile.
pub fn under_test() -> PathBuf {
    static SNAPSHOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SNAPSHOT
        .get_or_init(|| {
            let found = find();
            let dir = work_dir().join("debs");
            std::fs::create_dir_all(&dir).unwrap();
            // Snapshots of test processes that are gone.
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some((_, pid)) = name.rsplit_once(".deb.")
                    && pid.parse::<u32>().is_ok()
                    && !Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            let name = found.file_name().unwrap().to_string_lossy().into_owned();
            let snapshot = dir.join(format!("{name}.{}", std::process::id()));
            std::fs::copy(&found, &snapshot)
                .unwrap_or_else(|e| panic!("copy {}: {e}", found.display()));
            eprintln!("e2e: package under test: {}", found.display());
            snapshot
        })
        .clone()
}

/// `FLOWCOACH_E2E_DEB`, else the newest `target/debian/flowcoach_*.deb` (debug symbols
/// packages aside). Panics with what to do when there is none.
pub fn find() -> PathBuf {
    if let Ok(path) = std::env::var("FLOWCOACH_E2E_DEB")
        && !path.is_empty()
    {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "FLOWCOACH_E2E_DEB={} is no file",
            path.display()
        );
        return path;
    }
    let dir = target_dir().join("debian");
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("flowcoach_") && name.ends_with(".deb")
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    newest.unwrap_or_else(|| {
        panic!(
            "FLOWCOACH_E2E=1 but no package in {}: build it with packaging/build.sh \
             (or name one with FLOWCOACH_E2E_DEB)",
            dir.display()
        )
    })
}

impl Deb {
    pub async fn open(path: &Path) -> Deb {
        let field = async |name: &str| {
            host_ok(
                "dpkg-deb",
                &["-f", path.to_str().unwrap(), name],
                DPKG_TIMEOUT,
            )
            .await
            .trim()
            .to_owned()
        };
        let package = field("Package").await;
        let version = field("Version").await;
        let architecture = field("Architecture").await;
        let mut relations = field("Depends").await;
        relations.push(',');
        relations.push_str(&field("Pre-Depends").await);
        let depends = relations
            .split(',')
            .filter_map(|relation| {
                let first = relation.split('|').next()?.trim();
                let name = first.split([' ', '(', ':']).next()?.trim();
                (!name.is_empty()).then(|| name.to_owned())
            })
            .collect();
        let tree = tempfile::tempdir().unwrap();
        host_ok(
            "dpkg-deb",
            &["-x", path.to_str().unwrap(), tree.path().to_str().unwrap()],
            DPKG_TIMEOUT,
        )
        .await;
        Deb {
            path: path.to_owned(),
            package,
            version,
            architecture,
            depends,
            tree,
        }
    }

    /// A systemd unit of the package (`/lib/systemd/system` or `/usr/lib/systemd/system`).
    pub fn unit(&self, name: &str) -> Option<String> {
        ["lib/systemd/system", "usr/lib/systemd/system"]
            .iter()
            .map(|dir| self.tree.path().join(dir).join(name))
            .find_map(|path| std::fs::read_to_string(path).ok())
    }

    /// Where `flowcoach.service` loads the `slack-app-token` credential from
    /// (`LoadCredential=slack-app-token:PATH`).
    pub fn token_path(&self) -> String {
        let unit = self
            .unit("flowcoach.service")
            .expect("the package ships flowcoach.service");
        setting(&unit, "LoadCredential")
            .into_iter()
            .find_map(|value| {
                value
                    .strip_prefix("slack-app-token:")
                    .map(|p| p.trim().to_owned())
            })
            .expect("flowcoach.service has LoadCredential=slack-app-token:PATH")
    }

    /// The same package with version `<version><suffix>` (higher, for `suffix` like
    /// `+e2e1`), repacked with dpkg-deb into `target/e2e/debs/`.
    pub async fn bumped(&self, suffix: &str) -> Deb {
        let version = format!("{}{suffix}", self.version);
        let work = tempfile::tempdir_in(work_dir()).unwrap();
        let root = work.path().join("root");
        let root_s = root.to_str().unwrap();
        host_ok(
            "dpkg-deb",
            &["-R", self.path.to_str().unwrap(), root_s],
            DPKG_TIMEOUT,
        )
        .await;
        let control_path = root.join("DEBIAN/control");
        let control = std::fs::read_to_string(&control_path).unwrap();
        let control: String = control
            .lines()
            .map(|line| {
                if line.starts_with("Version:") {
                    format!("Version: {version}\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        std::fs::write(&control_path, control).unwrap();
        let out_dir = work_dir().join("debs");
        std::fs::create_dir_all(&out_dir).unwrap();
        let out = out_dir.join(format!(
            "{}_{}_{}.deb",
            self.package,
            version.replace(':', "%3a"),
            self.architecture
        ));
        host_ok(
            "dpkg-deb",
            &["--build", root_s, out.to_str().unwrap()],
            DPKG_TIMEOUT,
        )
        .await;
        Deb::open(&out).await
    }
}

/// The values of `key=` in a unit file (every occurrence, in order; no continuation lines).
pub fn setting(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| {
            let (k, v) = line.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
        .collect()
}
