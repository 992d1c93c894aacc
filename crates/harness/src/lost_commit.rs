//! A loopback proxy to the test's PostgreSQL that can lose the answer to a commit: the
//! server commits, the client never hears so (its connection breaks first). That is what
//! a server stopping, or a network failing, at the wrong moment does; here it happens on
//! demand, to the commit of a transaction that claimed envelopes for delivery.
//!
//! It reads the wire protocol's message framing (a type byte, then a length) to follow
//! which prepared statements claim (their SQL marks rows `'delivering'`), whether a
//! claim in the current transaction returned rows, and when the server has answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::postgres::{Postgres, tcp_url};

/// What marks the inbox's claim statements (a claim and a probe) in their SQL.
const CLAIM_MARK: &str = "SET state = 'delivering'";

/// The proxy; stops when dropped.
pub struct LostCommits {
    port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    /// How many claim commits are still to lose.
    armed: Mutex<usize>,
    /// How many were lost.
    lost: watch::Sender<usize>,
}

impl LostCommits {
    /// A proxy on a free loopback port, to `pg`'s TCP port.
    pub async fn start(pg: &Postgres) -> LostCommits {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = pg.port();
        let shared = Arc::new(Shared {
            armed: Mutex::new(0),
            lost: watch::Sender::new(0),
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        continue;
                    };
                    tokio::spawn(relay(client, server, shared.clone()));
                }
            }
        });
        LostCommits { port, shared, task }
    }

    /// A connection string through the proxy (the password is the server's).
    pub fn url(&self) -> String {
        tcp_url(self.port)
    }

    /// The next `count` commits of transactions that claimed envelopes are lost.
    pub fn arm(&self, count: usize) {
        *self.shared.armed.lock().unwrap() = count;
    }

    /// Commits lost so far.
    pub fn lost(&self) -> usize {
        *self.shared.lost.borrow()
    }
}

impl Drop for LostCommits {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection's protocol state, as both directions see it.
#[derive(Default)]
struct Session {
    /// Prepared statement name → whether it claims.
    claims: HashMap<Vec<u8>, bool>,
    /// A claim was executed; its answer has not ended yet.
    claim_running: bool,
    /// A claim in the open transaction returned rows.
    claimed: bool,
    /// The commit was sent on; its answer is to be swallowed, then the connection cut.
    losing: bool,
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (client_in, client_out) = client.into_split();
    let (server_in, server_out) = server.into_split();
    let session = Arc::new(Mutex::new(Session::default()));
    // Each direction ends on its own; dropping a write half shuts it, which ends the other.
    tokio::spawn(from_client(
        client_in,
        server_out,
        session.clone(),
        shared.clone(),
    ));
    tokio::spawn(from_server(server_in, client_out, session, shared));
}

async fn from_client(
    mut client: OwnedReadHalf,
    mut server: OwnedWriteHalf,
    session: Arc<Mutex<Session>>,
    shared: Arc<Shared>,
) {
    // The startup message has no type byte.
    let Ok(length) = client.read_u32().await else {
        return;
    };
    let mut startup = vec![0; (length as usize).saturating_sub(4)];
    if client.read_exact(&mut startup).await.is_err()
        || server.write_u32(length).await.is_err()
        || server.write_all(&startup).await.is_err()
    {
        return;
    }
    while let Some((kind, body)) = read_message(&mut client).await {
        {
            let mut session = session.lock().unwrap();
            match kind {
                // Parse: statement name, then its SQL.
                b'P' => {
                    let mut fields = body.split(|b| *b == 0);
                    let name = fields.next().unwrap_or_default().to_vec();
                    let sql = String::from_utf8_lossy(fields.next().unwrap_or_default());
                    session.claims.insert(name, sql.contains(CLAIM_MARK));
                }
                // Bind: portal name, then statement name.
                b'B' => {
                    let mut fields = body.split(|b| *b == 0);
                    let statement = fields.nth(1).unwrap_or_default();
                    if session.claims.get(statement) == Some(&true) {
                        session.claim_running = true;
                    }
                }
                b'Q' => {
                    let sql = String::from_utf8_lossy(&body);
                    let sql = sql.trim_end_matches('\0').trim().to_ascii_uppercase();
                    if sql == "COMMIT" && session.claimed {
                        let mut armed = shared.armed.lock().unwrap();
                        if *armed > 0 {
                            *armed -= 1;
                            session.losing = true;
                        }
                    }
                    if matches!(sql.as_str(), "BEGIN" | "COMMIT" | "ROLLBACK") {
                        session.claimed = false;
                    }
                }
                _ => {}
            }
        }
        if write_message(&mut server, kind, &body).await.is_err() {
            return;
        }
    }
}

async fn from_server(
    mut server: OwnedReadHalf,
    mut client: OwnedWriteHalf,
    session: Arc<Mutex<Session>>,
    shared: Arc<Shared>,
) {
    while let Some((kind, body)) = read_message(&mut server).await {
        let losing = {
            let mut session = session.lock().unwrap();
            match kind {
                b'D' if session.claim_running => session.claimed = true,
                b'Z' => session.claim_running = false,
                _ => {}
            }
            session.losing
        };
        if losing {
            // The server has answered the commit (ReadyForQuery ends the answer): it
            // committed. The client hears nothing, and its connection ends.
            if kind == b'Z' {
                shared.lost.send_modify(|lost| *lost += 1);
                return;
            }
            continue;
        }
        if write_message(&mut client, kind, &body).await.is_err() {
            return;
        }
    }
}

/// One message: its type byte and its body (the length stripped).
async fn read_message(from: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    let kind = from.read_u8().await.ok()?;
    let length = from.read_u32().await.ok()?;
    let mut body = vec![0; (length as usize).checked_sub(4)?];
    from.read_exact(&mut body).await.ok()?;
    Some((kind, body))
}

async fn write_message(
    to: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    body: &[u8],
) -> std::io::Result<()> {
    to.write_u8(kind).await?;
    to.write_u32(u32::try_from(body.len() + 4).expect("message length"))
        .await?;
    to.write_all(body).await
}
