//! The secret variables (`SLACK_APP_TOKEN`, `SLACK_SIGNING_SECRET`, `PGPASSWORD`), taken out of the
//! process environment at start: read once, erased from the environment block that
//! `/proc/PID/environ` shows, and removed from the environment children inherit. A
//! successor started for a handover gets them through an inherited pipe instead, whose
//! descriptor number `FLOWCOACH_APP_TOKEN_FD` names: one `NAME=value` line each (a
//! release that passed only the token wrote the bare token).

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::sync::OnceLock;

use super::env;

/// The variables taken out of the environment.
pub const SECRET_VARIABLES: [&str; 3] = [env::APP_TOKEN, env::SIGNING_SECRET, env::PGPASSWORD];

/// What the variables (or the predecessor's pipe) held, once taken: one entry per
/// variable that had a value, in the order of [`SECRET_VARIABLES`].
static TAKEN: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();

/// More than any token: a bound on what a descriptor may make us read.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(
        "{} = {value:?} is not the number of an inherited descriptor",
        env::APP_TOKEN_FD
    )]
    BadDescriptor { value: OsString },
    #[error("{}: descriptor {fd} is not a pipe", env::APP_TOKEN_FD)]
    NotAPipe { fd: RawFd },
    #[error("{}: cannot use descriptor {fd}", env::APP_TOKEN_FD)]
    Inspect {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot read the token from descriptor {fd}", env::APP_TOKEN_FD)]
    Read {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
}

/// Takes the secret variables out of the environment: from the pipe a predecessor passed,
/// else from the variables themselves, whose bytes in the initial environment block are
/// overwritten and which are then removed. From then on `ProcessEnv` gives the values
/// kept here.
///
/// # Safety
///
/// No other thread may run: the environment is changed (`remove_var`, and the block
/// `getenv` points into is overwritten), which races with any concurrent reader.
pub unsafe fn take_from_environment() -> Result<(), TakeError> {
    let from_pipe = match std::env::var_os(env::APP_TOKEN_FD) {
        Some(value) => {
            // SAFETY: single-threaded, by this function's contract.
            unsafe { std::env::remove_var(env::APP_TOKEN_FD) };
            Some(read_pipe(&value)?)
        }
        None => None,
    };
    let from_pipe = from_pipe.map(|text| parse_pipe(&text));
    let mut taken = Vec::new();
    for name in SECRET_VARIABLES {
        // SAFETY: single-threaded, by this function's contract.
        let from_variable = unsafe { erase_variable(name) };
        let passed = from_pipe
            .as_ref()
            .and_then(|values| values.iter().find(|(n, _)| *n == name))
            .map(|(_, value)| value.clone());
        if let Some(value) = passed.or(from_variable).filter(|v| !v.is_empty()) {
            taken.push((name, value));
        }
    }
    let _ = TAKEN.set(taken);
    Ok(())
}

/// `Some(value)` for a secret variable once [`take_from_environment`] ran (`value` is
/// what it found), `None` before or for another variable: read the environment then.
pub(super) fn taken(name: &str) -> Option<Option<String>> {
    let taken = TAKEN.get()?;
    SECRET_VARIABLES.contains(&name).then(|| {
        taken
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, value)| value.clone())
    })
}

/// Everything taken, for a successor's pipe.
pub fn taken_values() -> &'static [(&'static str, String)] {
    TAKEN.get().map_or(&[], Vec::as_slice)
}

/// The pipe's `NAME=value` lines; a text without them is a bare token, from a release that
/// passed only the token.
fn parse_pipe(text: &str) -> Vec<(&'static str, String)> {
    let values: Vec<_> = text
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once('=')?;
            let name = SECRET_VARIABLES.into_iter().find(|known| *known == name)?;
            Some((name, value.to_owned()))
        })
        .collect();
    if values.is_empty() {
        vec![(env::APP_TOKEN, text.trim().to_owned())]
    } else {
        values
    }
}

/// Reads `name`, then erases it from the environment and from the memory
/// `/proc/PID/environ` shows.
///
/// `remove_var` alone only drops the entry from libc's `environ` array: the string stays
/// in the initial environment block on the stack, which is what the kernel shows in
/// `/proc/PID/environ` for the process's whole life (moving that block needs
/// `CAP_SYS_RESOURCE`). So the value's bytes are overwritten in place first, through the
/// pointer `getenv` returns into that block (or into a copy made by an earlier `setenv`,
/// which is then erased as well).
///
/// # Safety
///
/// No other thread may run.
unsafe fn erase_variable(name: &str) -> Option<String> {
    let value = std::env::var_os(name)?;
    let c_name = CString::new(name).expect("variable names hold no NUL");
    // SAFETY: single-threaded (the caller's contract), so nothing changes the environment
    // between `getenv` and the write; the pointer is to `strlen(ptr)` writable bytes of the
    // entry's value, which no one reads afterwards (the entry is removed next).
    unsafe {
        let ptr = nix::libc::getenv(c_name.as_ptr());
        if !ptr.is_null() {
            std::ptr::write_bytes(ptr, 0, nix::libc::strlen(ptr));
        }
        std::env::remove_var(name);
    }
    Some(os_to_string(value))
}

fn os_to_string(value: OsString) -> String {
    value
        .into_string()
        .unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
}

/// Reads the token from the descriptor `value` names, to its end, and closes it.
fn read_pipe(value: &OsStr) -> Result<String, TakeError> {
    let fd = value
        .to_str()
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| TakeError::BadDescriptor {
            value: value.to_owned(),
        })?;
    // Only a pipe is taken: a wrong number must not make us read and close another
    // descriptor (a socket systemd passed, say).
    let kind = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|source| TakeError::Inspect { fd, source })?
        .file_type();
    if !kind.is_fifo() {
        return Err(TakeError::NotAPipe { fd });
    }
    // SAFETY: `fd` is open (just inspected) and is the pipe our predecessor passed for
    // this alone; nothing else in this process knows it, so owning (and closing) it is
    // sound.
    let pipe = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut token = Vec::new();
    std::fs::File::from(pipe)
        .take(MAX_TOKEN_BYTES)
        .read_to_end(&mut token)
        .map_err(|source| TakeError::Read { fd, source })?;
    Ok(String::from_utf8_lossy(&token).into_owned())
}

/// A pipe holding `values` (`NAME=value` lines) for a child, to its end: the read end, to
/// be inherited by the child under the number given in `FLOWCOACH_APP_TOKEN_FD`
/// (close-on-exec is set, so the child must clear it for that descriptor alone). The
/// write end is closed already.
pub fn pipe_for_child(values: &[(&str, String)]) -> std::io::Result<OwnedFd> {
    let mut text = String::new();
    for (name, value) in values {
        text.push_str(name);
        text.push('=');
        text.push_str(value.trim());
        text.push('\n');
    }
    // A pipe holds at least one page before a write blocks, and no one reads until the
    // child runs: a longer text would block here.
    if text.len() > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the secrets are too long to pass on through a pipe",
        ));
    }
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    std::fs::File::from(write).write_all(text.as_bytes())?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn the_secrets_go_through_the_pipe() {
        let values = [
            (env::APP_TOKEN, "xapp-1-A0PIPE-1-secret\n".to_owned()),
            (env::SIGNING_SECRET, "8f742231b10e".to_owned()),
        ];
        let fd = pipe_for_child(&values).unwrap().into_raw_fd();
        let text = read_pipe(OsStr::new(&fd.to_string())).unwrap();
        assert_eq!(
            parse_pipe(&text),
            vec![
                (env::APP_TOKEN, "xapp-1-A0PIPE-1-secret".to_owned()),
                (env::SIGNING_SECRET, "8f742231b10e".to_owned()),
            ]
        );
        // What a release that passed only the token wrote.
        assert_eq!(
            parse_pipe("xapp-1-A0PIPE-1-secret"),
            vec![(env::APP_TOKEN, "xapp-1-A0PIPE-1-secret".to_owned())]
        );
    }

    #[test]
    fn only_a_pipe_is_taken() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        let error = read_pipe(OsStr::new(&fd.to_string())).unwrap_err();
        assert!(matches!(error, TakeError::NotAPipe { .. }), "{error}");
        for value in ["2", "x", "-1"] {
            let error = read_pipe(OsStr::new(value)).unwrap_err();
            assert!(matches!(error, TakeError::BadDescriptor { .. }), "{error}");
        }
        assert!(pipe_for_child(&[(env::APP_TOKEN, "x".repeat(5000))]).is_err());
    }
}
