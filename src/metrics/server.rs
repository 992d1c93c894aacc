//! The `/metrics` endpoint: HTTP/1.1, one request per connection, few connections at a
//! time, each bounded in time, so that a stuck or hostile client cannot hold the daemon's
//! resources.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Exposition, Format};

/// Scrapers open one connection at a time; a few more leave room for a person with curl.
const MAX_CONNECTIONS: usize = 8;
/// A whole exchange, from accept to the last byte written.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `address` (the `[metrics] listen` setting), for [`serve`].
pub fn bind(address: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(address)
}

/// Serves `/metrics` on `listener` (bound here, passed by systemd or by a predecessor)
/// until `stop`.
pub async fn serve(
    listener: std::net::TcpListener,
    exposition: Arc<Exposition>,
    stop: CancellationToken,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "cannot serve the metrics endpoint");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint: accept failed");
                continue;
            }
        };
        // Beyond the bound the connection is closed at once: the scraper retries.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let exposition = exposition.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let response = answer(&exposition, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(error)) = tokio::time::timeout(EXCHANGE_TIMEOUT, connection).await {
                tracing::debug!(%error, "metrics endpoint: connection failed");
            }
        });
    }
}

fn answer(exposition: &Exposition, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let accept = request
        .headers()
        .get(ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::from_accept(accept);
    let mut response = Response::new(Full::new(Bytes::from(exposition.render(format))));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(format.content_type()),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
