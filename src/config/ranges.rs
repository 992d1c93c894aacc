//! The range of every number and duration in the settings. A value outside it would
//! overflow a clock (`Instant + Duration`) or a semaphore deep inside the service, wrap a
//! sum, or make no sense (a zero ping interval); it is refused up front, and the message
//! says the range.

use std::time::Duration;

use super::{ConfigError, invalid};

/// A duration field, its value and its inclusive range; `why` explains a bound that is
/// not obvious (empty when there is nothing to add).
pub(super) struct DurationIn {
    pub field: &'static str,
    pub value: Duration,
    pub min: Duration,
    pub max: Duration,
    pub why: &'static str,
}

/// A count field, its value and its inclusive range.
pub(super) struct CountIn {
    pub field: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
    pub why: &'static str,
}

/// The first field out of its range, if any.
pub(super) fn durations(checks: &[DurationIn]) -> Result<(), ConfigError> {
    for check in checks {
        if check.value < check.min || check.value > check.max {
            return Err(out_of_range(
                check.field,
                humantime::format_duration(check.value),
                humantime::format_duration(check.min),
                humantime::format_duration(check.max),
                check.why,
            ));
        }
    }
    Ok(())
}

/// The first field out of its range, if any.
pub(super) fn counts(checks: &[CountIn]) -> Result<(), ConfigError> {
    for check in checks {
        if check.value < check.min || check.value > check.max {
            return Err(out_of_range(
                check.field,
                check.value,
                check.min,
                check.max,
                check.why,
            ));
        }
    }
    Ok(())
}

/// `usize` and `u32` settings as counts (lossless on every target Rust supports here).
pub(super) fn count(value: impl TryInto<u64>) -> u64 {
    value.try_into().unwrap_or(u64::MAX)
}

fn out_of_range(
    field: &'static str,
    value: impl std::fmt::Display,
    min: impl std::fmt::Display,
    max: impl std::fmt::Display,
    why: &str,
) -> ConfigError {
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    invalid(
        field,
        format!("{value} is out of range: must be from {min} to {max}{why}"),
    )
}

pub(super) const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

pub(super) const fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

pub(super) const MINUTE: Duration = secs(60);
pub(super) const HOUR: Duration = secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_field_the_value_and_the_range() {
        let error = durations(&[DurationIn {
            field: "connection.stable_after",
            value: secs(7200),
            min: secs(1),
            max: HOUR,
            why: "",
        }])
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "connection.stable_after: 2h is out of range: must be from 1s to 1h"
        );
        let error = counts(&[CountIn {
            field: "dispatch.max_concurrent_handlers",
            value: 0,
            min: 1,
            max: 10_000,
            why: "handlers running at once",
        }])
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "dispatch.max_concurrent_handlers: 0 is out of range: must be from 1 to 10000 (handlers running at once)"
        );
    }

    #[test]
    fn bounds_are_inclusive() {
        let at = |value| DurationIn {
            field: "f",
            value,
            min: secs(1),
            max: secs(2),
            why: "",
        };
        assert!(durations(&[at(secs(1)), at(secs(2))]).is_ok());
        assert!(durations(&[at(ms(999))]).is_err());
        assert!(durations(&[at(ms(2001))]).is_err());
        assert_eq!(count(usize::MAX), u64::MAX);
    }
}
