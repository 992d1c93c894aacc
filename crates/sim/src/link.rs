//! The websocket side: accepts TCP connections on the link port, runs the upgrade
//! (refusing bad tickets or with a scripted status) and admits or refuses the socket.
//!
//! A raw `TcpListener` rather than axum's websocket support, so that each session owns its
//! `TcpStream` and can go half-open, hold TCP after the close handshake and see the client
//! drop it.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::unbounded_channel;
use tokio::time::Instant;
use tokio_tungstenite::accept_hdr_async;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http;
use tracing::{debug, warn};

use super::registry::Admission;
use super::session::Session;
use super::state::{Inner, Shared};

/// A client that connects but never completes the upgrade is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                debug!(%peer, "link connection");
                shared.tasks.spawn(serve_connection(shared.clone(), stream));
            }
            Err(error) => {
                // Usually EMFILE or a connection reset before accept: back off briefly.
                warn!(%error, "link accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    // Envelopes and acks are small and latency matters more than packet count.
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, "could not set TCP_NODELAY");
    }
    let mut admitted_app: Option<String> = None;
    let judge = UpgradeJudge {
        shared: &shared,
        admitted_app: &mut admitted_app,
    };
    let handshake = tokio::select! {
        () = shared.shutdown.cancelled() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_hdr_async(stream, judge)) => handshake,
    };
    let ws = match handshake {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            debug!(%error, "websocket handshake failed");
            return;
        }
        Err(_) => {
            debug!("websocket handshake timed out");
            return;
        }
    };
    let Some(app_id) = admitted_app else {
        return;
    };
    let (commands_tx, commands) = unbounded_channel();
    let (id, admission) = shared.update(|inner| {
        let now = Instant::now();
        let id = inner.new_socket(&app_id, now);
        let admission = inner.admit(id, &app_id, commands_tx, &shared.config, now);
        (id, admission)
    });
    let session = Session::new(shared, id, ws, commands);
    match admission {
        Admission::Hello(hello) => session.run(Some(hello)).await,
        Admission::Silent => session.run(None).await,
        Admission::TooManyWebsockets => session.refuse_too_many().await,
    }
}

/// Decides upgrade requests, remembering the app of an accepted one.
struct UpgradeJudge<'a> {
    shared: &'a Shared,
    admitted_app: &'a mut Option<String>,
}

impl Callback for UpgradeJudge<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        let verdict = self
            .shared
            .update(|inner| judge_upgrade(inner, request, Instant::now()));
        match verdict {
            Ok(app_id) => {
                *self.admitted_app = Some(app_id);
                Ok(response)
            }
            Err(refusal) => Err(refusal.into_response()),
        }
    }
}

/// An upgrade answered with an HTTP error instead of 101.
struct Refusal {
    status: u16,
    why: &'static str,
}

impl Refusal {
    fn into_response(self) -> ErrorResponse {
        let status =
            http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::BAD_REQUEST);
        let mut response = ErrorResponse::new(Some(self.why.to_owned()));
        *response.status_mut() = status;
        response
    }
}

/// Decides an upgrade request: the app of a valid ticket, or the refusal to send (which is
/// recorded here).
fn judge_upgrade(inner: &mut Inner, request: &Request, now: Instant) -> Result<String, Refusal> {
    let ticket = ticket_of(request);
    let path = request.uri().path();
    if path != "/link/" && path != "/link" {
        inner.refuse_handshake("", 404, now);
        return Err(Refusal {
            status: 404,
            why: "not found",
        });
    }
    if let Some(status) = inner.handshake_status {
        let app_id = ticket
            .as_deref()
            .and_then(|t| inner.tickets.app_of(t))
            .unwrap_or_default();
        inner.refuse_handshake(&app_id, status, now);
        return Err(Refusal {
            status,
            why: "scripted handshake refusal",
        });
    }
    let Some(ticket) = ticket else {
        inner.refuse_handshake("", 401, now);
        return Err(Refusal {
            status: 401,
            why: "missing ticket",
        });
    };
    match inner.tickets.redeem(&ticket, now) {
        Ok(app_id) => Ok(app_id),
        Err(refused) => {
            debug!(why = refused.why, "websocket ticket refused");
            inner.refuse_handshake(&refused.app_id.unwrap_or_default(), 401, now);
            Err(Refusal {
                status: 401,
                why: refused.why,
            })
        }
    }
}

fn ticket_of(request: &Request) -> Option<String> {
    let query = request.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "ticket")
        .map(|(_, value)| value.into_owned())
}
