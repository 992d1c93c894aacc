//! Deadlines for `select!` arms that may have nothing to wait for.

use std::time::Duration;

use tokio::time::Instant;

/// A deadline that never comes, for `select!` arms that are switched off.
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}
