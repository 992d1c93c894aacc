//! A no-op app in HTTP mode for `bench --forward`: it answers every request 200 with an
//! empty body and counts them, in the bench process, so that the figures are flowcoach's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use tokio::net::TcpListener;

pub struct NoOpApp {
    pub url: String,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl NoOpApp {
    pub async fn start() -> std::io::Result<NoOpApp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/slack/events", listener.local_addr()?);
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let router = axum::Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            std::future::ready(StatusCode::OK)
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(NoOpApp {
            url,
            requests,
            task,
        })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for NoOpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
