//! The answers to `flowcoachctl inbox`: counts, lists, retries and drops, from the store.

use std::time::SystemTime;

use super::ControlContext;
use super::protocol::{Command, InboxEntry, InboxReport, MAX_MESSAGE_BYTES, Response};
use crate::inbox::{Change, Which};

/// The most envelopes one list answer holds.
pub const MAX_LIST: u32 = 1000;

/// The answer to one inbox command (`command` is one of them).
pub async fn answer(ctx: &ControlContext, command: Command) -> Response {
    let Some(inbox) = &ctx.inbox else {
        return Response::error("the inbox is off here (inbox.enabled = false)");
    };
    let now = SystemTime::now();
    let result = match command {
        Command::Inbox => inbox
            .counts()
            .await
            .map(|counts| Response::Inbox(InboxReport::new(inbox.path(), &counts, now))),
        Command::InboxList {
            dead,
            payload,
            limit,
        } => inbox
            .list(dead, payload, limit.min(MAX_LIST) as usize)
            .await
            .map(|listed| {
                fitting(
                    listed
                        .into_iter()
                        .map(|listed| InboxEntry::new(listed, now))
                        .collect(),
                )
            }),
        Command::InboxRetry { id } => {
            let which = id.map_or(Which::AllDead, Which::One);
            inbox
                .change(Change::Retry { which, now })
                .await
                .map(|count| Response::InboxChanged { count })
        }
        Command::InboxDrop { id } => inbox
            .change(Change::Drop { id })
            .await
            .map(|count| Response::InboxChanged { count }),
        other => return Response::error(format!("not an inbox command: {other:?}")),
    };
    result.unwrap_or_else(|error| Response::error(error.to_string()))
}

/// The list, cut from the end until its answer fits in one message.
fn fitting(mut envelopes: Vec<InboxEntry>) -> Response {
    let mut truncated = false;
    loop {
        let response = Response::InboxList {
            envelopes,
            truncated,
        };
        let length = serde_json::to_vec(&response).map_or(0, |line| line.len());
        let Response::InboxList {
            envelopes: back, ..
        } = response
        else {
            unreachable!("built above");
        };
        envelopes = back;
        if length < MAX_MESSAGE_BYTES || envelopes.is_empty() {
            return Response::InboxList {
                envelopes,
                truncated,
            };
        }
        let keep = envelopes.len() * MAX_MESSAGE_BYTES / length.max(1);
        envelopes.truncate(keep.min(envelopes.len() - 1));
        truncated = true;
    }
}
