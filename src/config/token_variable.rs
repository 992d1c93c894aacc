//! `SLACK_APP_TOKEN`, taken out of the process environment at start: read once, erased
//! from the environment block that `/proc/PID/environ` shows, and removed from the
//! environment children inherit. A successor started for a handover gets it through an
//! inherited pipe instead, whose descriptor number `FLOWCOACH_APP_TOKEN_FD` names.

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::sync::OnceLock;

use super::env;

/// What the variable (or the predecessor's pipe) held, once taken.
static TAKEN: OnceLock<Option<String>> = OnceLock::new();

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

/// Takes the token out of the environment: from the pipe a predecessor passed, else from
/// `SLACK_APP_TOKEN`, whose bytes in the initial environment block are overwritten and
/// which is then removed. From then on `ProcessEnv` gives the value kept here.
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
    // SAFETY: single-threaded, by this function's contract.
    let from_variable = unsafe { erase_variable(env::APP_TOKEN) };
    let value = from_pipe.or(from_variable).filter(|v| !v.is_empty());
    let _ = TAKEN.set(value);
    Ok(())
}

/// `Some(value)` once [`take_from_environment`] ran (`value` is what it found), `None`
/// before: read the environment then.
pub(super) fn taken() -> Option<Option<String>> {
    TAKEN.get().cloned()
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

/// A pipe holding `token` for a child, to its end: the read end, to be inherited by the
/// child under the number given in `FLOWCOACH_APP_TOKEN_FD` (close-on-exec is set, so
/// the child must clear it for that descriptor alone). The write end is closed already.
pub fn pipe_for_child(token: &str) -> std::io::Result<OwnedFd> {
    // A pipe holds at least one page before a write blocks, and no one reads until the
    // child runs: a longer value would block here.
    if token.len() > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the token is too long to pass on through a pipe",
        ));
    }
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    std::fs::File::from(write).write_all(token.as_bytes())?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn a_token_goes_through_the_pipe() {
        let fd = pipe_for_child("xapp-1-A0PIPE-1-secret\n")
            .unwrap()
            .into_raw_fd();
        let token = read_pipe(OsStr::new(&fd.to_string())).unwrap();
        assert_eq!(token, "xapp-1-A0PIPE-1-secret\n");
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
        assert!(pipe_for_child(&"x".repeat(5000)).is_err());
    }
}
