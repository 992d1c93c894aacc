//! Websocket URL tickets: `apps.connections.open` issues one per call; the handshake
//! redeems it. Like Slack's URLs they are single-use and short-lived, so a client that
//! reconnects with an old URL is refused instead of silently working.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// How long an issued ticket may be redeemed.
pub(super) const TICKET_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct TicketBook {
    tickets: HashMap<String, Ticket>,
}

struct Ticket {
    app_id: String,
    expires_at: Instant,
    /// Redeemed tickets are kept until they expire so a reuse can name its app.
    redeemed: bool,
}

/// Why a ticket was not accepted; `app_id` is known if the ticket was ever issued.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Refused {
    pub(super) app_id: Option<String>,
    pub(super) why: &'static str,
}

impl TicketBook {
    pub(super) fn issue(&mut self, app_id: &str, now: Instant) -> String {
        // Forget expired tickets so the book stays as small as the recent call rate.
        self.tickets.retain(|_, t| t.expires_at > now);
        let ticket = format!("{:032x}", rand::random::<u128>());
        self.tickets.insert(
            ticket.clone(),
            Ticket {
                app_id: app_id.to_owned(),
                expires_at: now + TICKET_TTL,
                redeemed: false,
            },
        );
        ticket
    }

    /// The app a ticket was issued for, without redeeming it.
    pub(super) fn app_of(&self, ticket: &str) -> Option<String> {
        self.tickets.get(ticket).map(|t| t.app_id.clone())
    }

    /// Uses up the ticket and returns its app.
    pub(super) fn redeem(&mut self, ticket: &str, now: Instant) -> Result<String, Refused> {
        let Some(entry) = self.tickets.get_mut(ticket) else {
            return Err(Refused {
                app_id: None,
                why: "unknown ticket",
            });
        };
        let why = if entry.redeemed {
            "ticket already used"
        } else if entry.expires_at <= now {
            "ticket expired"
        } else {
            entry.redeemed = true;
            return Ok(entry.app_id.clone());
        };
        Err(Refused {
            app_id: Some(entry.app_id.clone()),
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_single_use() {
        let mut book = TicketBook::default();
        let now = Instant::now();
        let ticket = book.issue("A1", now);
        assert_eq!(book.app_of(&ticket).as_deref(), Some("A1"));
        assert_eq!(book.redeem(&ticket, now), Ok("A1".to_owned()));
        let reuse = book.redeem(&ticket, now).unwrap_err();
        assert_eq!(reuse.app_id.as_deref(), Some("A1"));
        assert_eq!(reuse.why, "ticket already used");
    }

    #[test]
    fn tickets_expire_and_unknown_ones_are_refused() {
        let mut book = TicketBook::default();
        let now = Instant::now();
        let ticket = book.issue("A1", now);
        let refused = book.redeem(&ticket, now + TICKET_TTL).unwrap_err();
        assert_eq!(refused.why, "ticket expired");
        assert_eq!(book.redeem("nope", now).unwrap_err().app_id, None);
    }

    #[test]
    fn issuing_forgets_expired_tickets() {
        let mut book = TicketBook::default();
        let now = Instant::now();
        let old = book.issue("A1", now);
        let fresh = book.issue("A1", now + TICKET_TTL);
        assert_ne!(old, fresh);
        assert_eq!(book.tickets.len(), 1);
    }
}
