//! The admin listener: liveness and readiness for orchestrators. Later issues add `/metrics`,
//! `/capture` and `/traces` here.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::body::ResponseBody;
use crate::proxy::Proxy;

/// What the admin endpoints look at.
#[derive(Debug, Clone)]
pub struct AdminState {
    proxy: Arc<Proxy>,
    draining: Arc<AtomicBool>,
}

impl AdminState {
    pub fn new(proxy: Arc<Proxy>, draining: Arc<AtomicBool>) -> Self {
        Self { proxy, draining }
    }

    async fn route(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json(StatusCode::OK, r#"{"status":"alive"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") => {
                if self.draining.load(Ordering::SeqCst) {
                    json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
                } else if self.proxy.upstream().is_reachable().await {
                    json(StatusCode::OK, r#"{"status":"ready"}"#)
                } else {
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        r#"{"status":"upstream_unreachable"}"#,
                    )
                }
            }
            (_, "/healthz" | "/readyz") => json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"method_not_allowed"}"#,
            ),
            _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
        }
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves the admin endpoints over HTTP/1.1 until the task is aborted.
pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!("admin accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.route(request).await) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = result {
                tracing::debug!("admin connection ended with an error: {error}");
            }
        });
    }
}
