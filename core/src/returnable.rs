//! A request body that comes back to the proxy when the upstream never read it.
//!
//! When the upstream cannot be reached (connect refused, timed out) or the proxy refuses the
//! request itself, the HTTP client drops the request without reading its body. For a captured
//! exchange that would lose the model input from the record of the very failure a user wants to
//! look into; so an untouched body is handed back, and the proxy reads it through the tee before
//! answering (bounded by [`DRAIN_DEADLINE`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

/// How long the proxy waits for an unread body it reads only to record it.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(1);

/// A body that returns itself through `return_to` if dropped before it was first polled.
#[derive(Debug)]
pub struct ReturnableBody<B> {
    body: Option<B>,
    return_to: Option<oneshot::Sender<B>>,
}

/// Receives a body the upstream never read.
#[derive(Debug)]
pub struct ReturnedBody<B>(oneshot::Receiver<B>);

impl<B> ReturnableBody<B> {
    /// A body that is simply forwarded.
    pub fn forwarded(body: B) -> Self {
        Self {
            body: Some(body),
            return_to: None,
        }
    }

    /// A body that comes back through the returned receiver if nobody reads it.
    pub fn returnable(body: B) -> (Self, ReturnedBody<B>) {
        let (sender, receiver) = oneshot::channel();
        (
            Self {
                body: Some(body),
                return_to: Some(sender),
            },
            ReturnedBody(receiver),
        )
    }
}

impl<B> Drop for ReturnableBody<B> {
    fn drop(&mut self) {
        if let (Some(body), Some(return_to)) = (self.body.take(), self.return_to.take()) {
            // The receiver may be gone (the exchange ended); then the body is simply dropped.
            let _ = return_to.send(body);
        }
    }
}

impl<B> Body for ReturnableBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        // Once read, the body belongs to the upstream exchange.
        this.return_to = None;
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(context),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B> ReturnedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    /// Reads the body to its end if it came back unread, up to the deadline; what it reads goes
    /// through whatever tee wraps it. Returns whether a body came back.
    pub async fn drain(mut self) -> bool {
        let Ok(mut body) = self.0.try_recv() else {
            return false;
        };
        let read_all = async {
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(DRAIN_DEADLINE, read_all)
            .await
            .is_err()
        {
            tracing::debug!("stopped reading an unread request body for capture at the deadline");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn an_unread_body_comes_back() {
        let (body, returned) = ReturnableBody::returnable(Full::new(Bytes::from_static(b"in")));
        drop(body);
        assert!(returned.drain().await);
    }

    #[tokio::test]
    async fn a_read_body_does_not() {
        let (mut body, returned) = ReturnableBody::returnable(Full::new(Bytes::from_static(b"in")));
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"in")));
        drop(body);
        assert!(!returned.drain().await);
    }
}
