//! The state every simulator task shares: one lock around everything that changes, and a
//! change counter that wakes `wait_until` callers whenever the record may have changed.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::api::{OpenOverrides, reachable};
use super::bot_api::BotState;
use super::config::SimConfig;
use super::delivery::Deliveries;
use super::record::Record;
use super::registry::Registry;
use super::tickets::TicketBook;

pub(super) struct Shared {
    pub(super) config: SimConfig,
    pub(super) api_addr: SocketAddr,
    pub(super) link_addr: SocketAddr,
    /// Wakes the redelivery timer when the first ack deadline is set.
    pub(super) timer_wakeup: Arc<Notify>,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: TaskTracker,
    /// Numbers load runs so their event ids never collide.
    pub(super) load_runs: AtomicU64,
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
}

/// Everything mutable. Kept behind one short-held lock so that a delivery, the socket it
/// picks and the record entry it writes can never disagree.
pub(super) struct Inner {
    pub(super) record: Record,
    pub(super) sockets: Registry,
    pub(super) deliveries: Deliveries,
    pub(super) tickets: TicketBook,
    pub(super) open_overrides: OpenOverrides,
    pub(super) handshake_status: Option<u16>,
    /// `http://ADDR/response/`: an envelope's `response_url` is this plus its id.
    pub(super) response_url_base: String,
    pub(super) bot: BotState,
}

impl Inner {
    pub(super) fn new(
        config: &SimConfig,
        timer_wakeup: Arc<Notify>,
        response_url_base: String,
    ) -> Self {
        Inner {
            record: Record::default(),
            sockets: Registry::default(),
            deliveries: Deliveries::new(config.ack_deadline, config.max_retries, timer_wakeup),
            tickets: TicketBook::default(),
            open_overrides: OpenOverrides::default(),
            handshake_status: None,
            response_url_base,
            bot: BotState::default(),
        }
    }

    /// The `response_url` of the envelope with this id.
    pub(super) fn response_url(&self, envelope_id: &str) -> String {
        format!("{}{envelope_id}", self.response_url_base)
    }
}

impl Shared {
    pub(super) fn new(
        config: SimConfig,
        api_addr: SocketAddr,
        link_addr: SocketAddr,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let timer_wakeup = Arc::new(Notify::new());
        Shared {
            inner: Mutex::new(Inner::new(
                &config,
                timer_wakeup.clone(),
                format!("http://{}/response/", reachable(api_addr)),
            )),
            config,
            api_addr,
            link_addr,
            timer_wakeup,
            shutdown,
            tasks,
            load_runs: AtomicU64::new(0),
            changes: watch::channel(0).0,
        }
    }

    /// Runs `change` under the lock, then wakes everyone waiting for record changes.
    pub(super) fn update<R>(&self, change: impl FnOnce(&mut Inner) -> R) -> R {
        let result = change(&mut self.lock());
        self.changes
            .send_modify(|version| *version = version.wrapping_add(1));
        result
    }

    /// Reads under the lock without signalling a change.
    pub(super) fn read<R>(&self, look: impl FnOnce(&Inner) -> R) -> R {
        look(&self.lock())
    }

    /// A receiver that is marked changed after every [`Shared::update`].
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in another task must not hide the record from the test that inspects it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
