//! The deduplication state in transit: thousands of entries do not fit one line of a
//! session, so the incumbent sends `state_part` steps and a final `state`, each line within
//! the session's limit, and the successor puts them together.

use std::time::Duration;

use super::session::MAX_LINE_BYTES;
use super::{HandoverError, Session, Step};
use crate::dispatch::DedupSnapshot;

/// Room in a line for the snapshot: the step around it (`{"step":"state_part","dedup":`,
/// `}` and the newline) takes less than this much of it.
const STEP_OVERHEAD: usize = 64;

/// Sends `snapshot` as `state_part` steps and a final `state`.
pub async fn send(session: &mut Session, snapshot: DedupSnapshot) -> Result<(), HandoverError> {
    let mut parts = snapshot
        .into_parts(MAX_LINE_BYTES - STEP_OVERHEAD)
        .into_iter()
        .peekable();
    while let Some(dedup) = parts.next() {
        let step = if parts.peek().is_some() {
            Step::StatePart { dedup }
        } else {
            Step::State { dedup }
        };
        session.send(&step).await?;
    }
    Ok(())
}

/// Receives what [`send`] sends, all within `bound`. Steps before or between the parts
/// go to `other`, which hands back those it does not take (the session is out of step).
pub async fn receive(
    session: &mut Session,
    bound: Duration,
    waiting: &'static str,
    mut other: impl FnMut(Step) -> Result<(), Step>,
) -> Result<DedupSnapshot, HandoverError> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut snapshot: Option<DedupSnapshot> = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (part, last) = match session.step(left, waiting).await? {
            Step::StatePart { dedup } => (dedup, false),
            Step::State { dedup } => (dedup, true),
            step => match other(step) {
                Ok(()) => continue,
                Err(step) => {
                    return Err(HandoverError::Unexpected {
                        got: format!("{step:?}"),
                        waiting,
                    });
                }
            },
        };
        let whole = match snapshot.take() {
            None => part,
            Some(mut whole) => {
                if !whole.merge(part) {
                    return Err(HandoverError::Unexpected {
                        got: "a part of another deduplication set".to_owned(),
                        waiting,
                    });
                }
                whole
            }
        };
        if last {
            return Ok(whole);
        }
        snapshot = Some(whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Dedup;
    use tokio::net::UnixStream;
    use tokio::time::Instant;

    const WAIT: Duration = Duration::from_secs(10);

    /// A full set (20 000 entries, the default capacity, inserted over several seconds)
    /// travels over a real socket in lines within the limit, and arrives whole.
    #[tokio::test]
    async fn a_large_set_travels_in_parts() {
        let ttl = Duration::from_secs(900);
        let mut old = Dedup::new(ttl, 20_000);
        let t0 = Instant::now();
        for i in 0..20_000u64 {
            old.insert(&format!("Ev{i:08}"), t0 + Duration::from_millis(i / 4));
        }
        let handover = t0 + Duration::from_secs(6);
        let snapshot = old.snapshot(handover);
        assert_eq!(snapshot.len(), 20_000);
        let whole = serde_json::to_vec(&snapshot).unwrap().len();
        assert!(
            whole > 4 * MAX_LINE_BYTES,
            "{whole} bytes: one line would not do"
        );

        let (ours, theirs) = UnixStream::pair().unwrap();
        let (mut incumbent, mut successor) = (Session::new(ours), Session::new(theirs));
        let sent = snapshot.clone();
        let sending = tokio::spawn(async move { send(&mut incumbent, sent).await });
        let received = receive(&mut successor, WAIT, "receiving the state", Err)
            .await
            .unwrap();
        sending.await.unwrap().unwrap();
        assert_eq!(received, snapshot);

        let mut new = Dedup::new(ttl, 20_000);
        assert!(new.adopt(received, handover));
        assert_eq!(new.len(), 20_000);
        assert!(new.contains("Ev00000000", handover));
        assert!(new.contains("Ev00019999", handover));
        assert!(!new.contains("Ev00020000", handover));
    }
}
