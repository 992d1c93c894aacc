//! What flowcoach's JSON log lines tell about the envelopes it handled.

use std::collections::HashMap;

use serde_json::Value;

/// The built-in handler's line for each event it handled.
pub const EVENT_HANDLED: &str = "event handled";

/// How many "event handled" lines each event id has, over `lines` (one process's log, or
/// several processes' together).
pub fn handled_events<'a>(lines: impl IntoIterator<Item = &'a Value>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in lines {
        if line["message"] == EVENT_HANDLED
            && let Some(event_id) = line["event_id"].as_str()
        {
            *counts.entry(event_id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}
