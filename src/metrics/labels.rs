//! Bounded label values. Every label is a fixed enum, so the number of series cannot grow
//! with traffic: no envelope ids, users or channels ever become a label.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use flowcoach_protocol::{DisconnectReason, EnvelopeKind};

/// A label whose values are known in advance.
pub trait Label: fmt::Debug + Copy + Send + Sync + 'static {
    /// The label's name in the exposition.
    const KEY: &'static str;
    /// Every value, in index order.
    const ALL: &'static [Self];
    fn index(self) -> usize;
    fn as_str(self) -> &'static str;
}

macro_rules! label {
    ($(#[$doc:meta])* $name:ident, $key:literal, { $($variant:ident => $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl Label for $name {
            const KEY: &'static str = $key;
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn index(self) -> usize {
                self as usize
            }
            fn as_str(self) -> &'static str {
                match self { $($name::$variant => $value),+ }
            }
        }
    };
}

label!(
    /// An envelope's type; `unknown` for the envelopes of a type flowcoach does not handle
    /// (acked, not dispatched).
    EnvelopeType, "type", {
        EventsApi => "events_api",
        SlashCommands => "slash_commands",
        Interactive => "interactive",
        Unknown => "unknown",
    }
);

impl From<EnvelopeKind> for EnvelopeType {
    fn from(kind: EnvelopeKind) -> Self {
        match kind {
            EnvelopeKind::EventsApi => EnvelopeType::EventsApi,
            EnvelopeKind::SlashCommands => EnvelopeType::SlashCommands,
            EnvelopeKind::Interactive => EnvelopeType::Interactive,
        }
    }
}

label!(
    /// Why a connection had to be replaced without a rotation.
    ReconnectCause, "cause", {
        ClosedByUs => "closed_by_us",
        ClosedBySlack => "closed_by_slack",
        Stale => "stale",
        Oversized => "oversized",
        Lost => "lost",
        TooManyWebsockets => "too_many_websockets",
    }
);

label!(
    /// The reason of a `disconnect` message from Slack.
    DisconnectLabel, "reason", {
        Warning => "warning",
        RefreshRequested => "refresh_requested",
        LinkDisabled => "link_disabled",
        TooManyWebsockets => "too_many_websockets",
        Other => "other",
    }
);

impl From<&DisconnectReason> for DisconnectLabel {
    fn from(reason: &DisconnectReason) -> Self {
        match reason {
            DisconnectReason::Warning => DisconnectLabel::Warning,
            DisconnectReason::RefreshRequested => DisconnectLabel::RefreshRequested,
            DisconnectReason::LinkDisabled => DisconnectLabel::LinkDisabled,
            DisconnectReason::TooManyWebsockets => DisconnectLabel::TooManyWebsockets,
            DisconnectReason::Other(_) => DisconnectLabel::Other,
        }
    }
}

label!(
    /// How an `apps.connections.open` call ended.
    OpenOutcome, "outcome", {
        Ok => "ok",
        RateLimited => "rate_limited",
        Transient => "transient_error",
        Permanent => "permanent_error",
    }
);

label!(
    /// How a handover this instance took part in ended.
    HandoverOutcome, "outcome", {
        Completed => "completed",
        Failed => "failed",
    }
);

/// One counter per value of `L`: a labelled family that cannot grow.
pub struct ByLabel<L: Label> {
    counts: Box<[AtomicU64]>,
    label: PhantomData<L>,
}

impl<L: Label> Default for ByLabel<L> {
    fn default() -> Self {
        ByLabel {
            counts: L::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            label: PhantomData,
        }
    }
}

impl<L: Label> fmt::Debug for ByLabel<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<L: Label> ByLabel<L> {
    pub fn bump(&self, label: L) {
        self.add(label, 1);
    }

    pub fn add(&self, label: L, n: u64) {
        self.counts[label.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, label: L) -> u64 {
        self.counts[label.index()].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Every value with its count, zeros included, so that each series exists from the
    /// first scrape on (`rate()` and `increase()` need the zero).
    pub fn iter(&self) -> impl Iterator<Item = (L, u64)> + '_ {
        L::ALL.iter().map(|&label| (label, self.get(label)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_value_and_in_total() {
        let counts = ByLabel::<EnvelopeType>::default();
        counts.bump(EnvelopeType::EventsApi);
        counts.add(EnvelopeType::Interactive, 2);
        assert_eq!(counts.get(EnvelopeType::Interactive), 2);
        assert_eq!(counts.total(), 3);
        assert_eq!(counts.iter().count(), EnvelopeType::ALL.len());
    }

    #[test]
    fn values_are_in_index_order() {
        for (index, value) in ReconnectCause::ALL.iter().enumerate() {
            assert_eq!(value.index(), index);
        }
    }
}
