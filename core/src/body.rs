//! The response body the proxy hands to hyper: the upstream's streamed body, or a small body the
//! proxy made itself (an error answer). An enum rather than a boxed trait object, so the hot path
//! allocates nothing for it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A body sent to the client.
#[derive(Debug)]
pub enum ResponseBody {
    /// The upstream's body, forwarded frame by frame.
    Upstream { inner: Incoming },
    /// A body the proxy made whole (error answers, admin answers); `None` once sent.
    Full { data: Option<Bytes> },
}

impl ResponseBody {
    /// A body made of one buffer.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ResponseBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ResponseBody::Full { data: None }
    }

    /// Hands the upstream's body, dropped before its end, to
    /// [`crate::tee::linger_for_end`] (a [`crate::tee::Linger`]); a body the proxy made has
    /// nothing on its way.
    pub fn linger(self: Pin<&mut Self>, tap: crate::tee::BodyTap) {
        if let ResponseBody::Upstream { inner } = std::mem::replace(self.get_mut(), Self::empty()) {
            crate::tee::linger_for_end(inner, tap);
        }
    }
}

impl From<Incoming> for ResponseBody {
    fn from(inner: Incoming) -> Self {
        ResponseBody::Upstream { inner }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream { inner } => Pin::new(inner).poll_frame(context),
            ResponseBody::Full { data } => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { inner } => inner.is_end_stream(),
            ResponseBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { inner } => inner.size_hint(),
            ResponseBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
        }
    }
}
