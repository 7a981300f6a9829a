//! Follows HTTP/1.1 request framing on the bytes a client sends, ahead of hyper, to find what
//! hyper resolves silently before a request reaches the proxy: a head with both
//! `Content-Length` and `Transfer-Encoding`, duplicate `Content-Length` lines, or a bare LF
//! (see [`HeadViolation`]). It also tells the connection guard when a head starts and ends, for
//! the header read timeout.
//!
//! hyper stays the parser that decides: this tracker never changes a byte and never rejects on
//! its own. It mirrors hyper's framing (RFC 9112 §6.3: a chunked body when the last
//! transfer coding is `chunked`, else `Content-Length`, else no body) and its chunked decoder
//! byte for byte. Wherever hyper would refuse the message (and close the connection), or the
//! bytes stop being HTTP/1.1 requests (an upgrade that was granted, the HTTP/2 preface), the
//! tracker stops following the connection: what it reports is only ever about heads it saw whole.
//!
//! A request that asks to switch protocols (an `Upgrade` field, or `CONNECT`) does not switch
//! them by itself: RFC 9110 §7.8, "A server MAY ignore a received Upgrade header field if it
//! wishes to continue using the current protocol on that connection", and then the connection
//! goes on carrying HTTP/1.1 requests. After such a request the tracker holds what follows
//! (up to the head limit) until the answer is known ([`RequestFraming::upgrade_answered`]): a
//! 101 ends the tracking, anything else resumes it with the held bytes.

use crate::headers::HeadViolation;

/// What the tracker reports while following a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FramingEvent {
    /// The first byte of a request head arrived.
    HeadStarted,
    /// A request head ended; what was wrong with it, if anything.
    HeadComplete(Option<HeadViolation>),
    /// A request head went past the size limit (complete or not); the tracker stops following.
    HeadTooLarge,
    /// The head that just completed asks to switch protocols: what follows its body is held
    /// until [`RequestFraming::upgrade_answered`].
    UpgradeRequested,
    /// The client speaks HTTP/2 (its first bytes are the connection preface).
    Http2,
    /// The tracker no longer follows the connection (a granted upgrade, a head hyper refuses,
    /// a head larger than the limit, a violation after which the connection closes).
    Untracked,
}

/// The request stream's framing state.
#[derive(Debug)]
enum State {
    /// Before or inside a head.
    Head,
    /// Inside a body of known length: bytes still to come.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// After a request that asked to switch protocols, until the answer is known: what comes
    /// is held, not read.
    AwaitingUpgrade,
    /// Not following the connection any more.
    Untracked,
}

/// hyper's chunked decoder states (hyper `proto::h1::decode::ChunkedState`), with the size
/// read so far where it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

/// The body framing a head announces (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Empty,
    Length(u64),
    Chunked,
}

/// What a complete head means for the rest of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Body(Body),
    /// The HTTP/2 connection preface.
    Http2,
    /// Stop following: hyper refuses the head, or the connection stops carrying requests.
    Untracked,
}

/// What a scanned head holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scanned {
    violation: Option<HeadViolation>,
    next: Next,
    /// The request asks to switch protocols (`Upgrade`, or `CONNECT`).
    upgrade: bool,
}

/// Follows one connection's request bytes.
#[derive(Debug)]
pub(crate) struct RequestFraming {
    state: State,
    /// The current head's first byte (after leading empty lines) has come.
    head_started: bool,
    /// The head so far when it spans reads; empty otherwise.
    head: Vec<u8>,
    /// How far `head` has been searched for its end.
    searched: usize,
    /// Past this many head bytes the request is refused with 431.
    maximum_head_bytes: usize,
    /// The request being read asked to switch protocols: after its body, wait for the answer.
    upgrade_requested: bool,
    /// The bytes received while awaiting the answer to an upgrade request.
    held: Vec<u8>,
    /// More than `maximum_head_bytes` came while awaiting the answer; only the count was kept.
    held_too_much: bool,
}

impl RequestFraming {
    pub(crate) fn new(maximum_head_bytes: usize) -> Self {
        Self {
            state: State::Head,
            head_started: false,
            head: Vec::new(),
            searched: 0,
            maximum_head_bytes,
            upgrade_requested: false,
            held: Vec::new(),
            held_too_much: false,
        }
    }

    /// Whether the tracker still follows the connection.
    pub(crate) fn is_tracking(&self) -> bool {
        !matches!(self.state, State::Untracked)
    }

    /// Follows `data`, the next bytes the client sent, reporting through `report`.
    pub(crate) fn feed(&mut self, mut data: &[u8], report: &mut impl FnMut(FramingEvent)) {
        while !data.is_empty() {
            data = match self.state {
                State::Untracked => return,
                State::Head => self.feed_head(data, report),
                State::AwaitingUpgrade => self.hold(data),
                State::Length(remaining) => {
                    let taken = take(remaining, data.len());
                    self.state = match remaining - taken as u64 {
                        0 => self.after_body(),
                        remaining => State::Length(remaining),
                    };
                    &data[taken..]
                }
                State::Chunked(chunk) => {
                    let (rest, next) = feed_chunked(chunk, data);
                    self.state = match next {
                        Some(Some(chunk)) => State::Chunked(chunk),
                        Some(None) => self.after_body(),
                        None => {
                            report(FramingEvent::Untracked);
                            State::Untracked
                        }
                    };
                    rest
                }
            };
        }
    }

    /// The state after a request's body: the next head, or the answer to an upgrade request.
    fn after_body(&mut self) -> State {
        if std::mem::take(&mut self.upgrade_requested) {
            State::AwaitingUpgrade
        } else {
            State::Head
        }
    }

    /// Holds bytes that came after an upgrade request, up to the head limit.
    fn hold<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if !self.held_too_much {
            if self.held.len() + data.len() > self.maximum_head_bytes {
                self.held_too_much = true;
                self.held = Vec::new();
            } else {
                self.held.extend_from_slice(data);
            }
        }
        &data[data.len()..]
    }

    /// The answer to the request that asked to switch protocols is known: `switched` when it
    /// was 101, after which the connection no longer carries requests. Otherwise the tracker
    /// goes on following requests, starting with the bytes held meanwhile; more of them than a
    /// head may have are reported as a head too large (they were sent without waiting for the
    /// answer, and cannot all be followed).
    pub(crate) fn upgrade_answered(
        &mut self,
        switched: bool,
        report: &mut impl FnMut(FramingEvent),
    ) {
        let awaiting = matches!(self.state, State::AwaitingUpgrade);
        if !awaiting && !self.upgrade_requested {
            return;
        }
        self.upgrade_requested = false;
        let held = std::mem::take(&mut self.held);
        let held_too_much = std::mem::take(&mut self.held_too_much);
        if switched {
            self.state = State::Untracked;
            report(FramingEvent::Untracked);
        } else if awaiting {
            self.state = State::Head;
            if held_too_much {
                report(FramingEvent::HeadStarted);
                self.too_large(report);
            } else {
                self.feed(&held, report);
            }
        }
    }

    /// Feeds bytes to a head; returns what follows it.
    fn feed_head<'a>(
        &mut self,
        mut data: &'a [u8],
        report: &mut impl FnMut(FramingEvent),
    ) -> &'a [u8] {
        if !self.head_started {
            // httparse skips empty lines before the request line (RFC 9112 §2.2: "a server
            // that is expecting to receive and parse a request-line SHOULD ignore at least one
            // empty line (CRLF) received prior to the request-line").
            let leading = data
                .iter()
                .take_while(|&&byte| byte == b'\r' || byte == b'\n')
                .count();
            data = &data[leading..];
            if data.is_empty() {
                return data;
            }
            self.head_started = true;
            report(FramingEvent::HeadStarted);
        }
        let buffered = self.head.len();
        let (end, rest) = if buffered == 0 {
            match head_end(data, 0) {
                Some(end) => (end, &data[end..]),
                None => return self.buffer(data, report),
            }
        } else {
            self.head.extend_from_slice(data);
            match head_end(&self.head, self.searched.saturating_sub(2)) {
                Some(end) => (end, &data[end.saturating_sub(buffered)..]),
                None => {
                    self.head.truncate(buffered);
                    return self.buffer(data, report);
                }
            }
        };
        let scanned = if buffered == 0 {
            scan_head(&data[..end])
        } else {
            scan_head(&self.head[..end])
        };
        self.head = Vec::new();
        self.searched = 0;
        self.head_started = false;
        if end > self.maximum_head_bytes {
            self.too_large(report);
            return rest;
        }
        report(FramingEvent::HeadComplete(scanned.violation));
        if scanned.upgrade && matches!(scanned.next, Next::Body(_)) {
            report(FramingEvent::UpgradeRequested);
            self.upgrade_requested = true;
        }
        self.state = match scanned.next {
            Next::Body(Body::Empty | Body::Length(0)) => self.after_body(),
            Next::Body(Body::Length(length)) => State::Length(length),
            Next::Body(Body::Chunked) => State::Chunked(Chunk::Start),
            Next::Http2 => {
                report(FramingEvent::Http2);
                State::Untracked
            }
            Next::Untracked => {
                report(FramingEvent::Untracked);
                State::Untracked
            }
        };
        rest
    }

    /// Keeps an incomplete head for the next read, up to the limit.
    fn buffer<'a>(&mut self, data: &'a [u8], report: &mut impl FnMut(FramingEvent)) -> &'a [u8] {
        self.head.extend_from_slice(data);
        self.searched = self.head.len();
        if self.head.len() > self.maximum_head_bytes {
            self.too_large(report);
        }
        &data[data.len()..]
    }

    /// The head is over the limit: reported, and the connection no longer followed (the proxy
    /// closes it after its 431, or hyper refuses the head first).
    fn too_large(&mut self, report: &mut impl FnMut(FramingEvent)) {
        self.head = Vec::new();
        self.state = State::Untracked;
        report(FramingEvent::HeadTooLarge);
        report(FramingEvent::Untracked);
    }
}

/// The length of the head at the start of `bytes` (through its terminating empty line), if it
/// is all there. A line ends at LF (with or without a CR before it, as httparse reads it); the
/// head ends at the first empty line. The search starts at `from`.
fn head_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut index = from;
    while let Some(offset) = bytes[index..].iter().position(|&byte| byte == b'\n') {
        let newline = index + offset;
        match bytes.get(newline + 1) {
            Some(b'\n') => return Some(newline + 2),
            Some(b'\r') if bytes.get(newline + 2) == Some(&b'\n') => return Some(newline + 3),
            _ => index = newline + 1,
        }
    }
    None
}

/// Reads one complete head: its violation, and the framing of what follows.
fn scan_head(head: &[u8]) -> Scanned {
    let untracked = Scanned {
        violation: None,
        next: Next::Untracked,
        upgrade: false,
    };
    let mut bare_line_feed = false;
    // Every line, the terminating empty one included, without its LF; a CR before the LF
    // belongs to the CRLF.
    let mut lines = head
        .strip_suffix(b"\n")
        .unwrap_or(head)
        .split(|&byte| byte == b'\n')
        .map(|raw| match raw.strip_suffix(b"\r") {
            Some(line) => (line, false),
            None => (raw, true),
        })
        .inspect(|&(_, bare)| bare_line_feed |= bare)
        .map(|(line, _)| line)
        .filter(|line| !line.is_empty());
    let Some(request_line) = lines.next() else {
        return untracked;
    };
    let mut parts = request_line.split(|&byte| byte == b' ');
    let method = parts.next().unwrap_or_default();
    let _target = parts.next();
    let version = parts.next().unwrap_or_default();
    if method == b"PRI" && version == b"HTTP/2.0" {
        return Scanned {
            violation: None,
            next: Next::Http2,
            upgrade: false,
        };
    }
    let mut content_lengths: Vec<u64> = Vec::new();
    let mut transfer_encoding: Option<bool> = None;
    let mut upgrade = method == b"CONNECT";
    for field in lines.by_ref() {
        if field[0] == b' ' || field[0] == b'\t' {
            // obs-fold: httparse refuses it, hyper answers 400.
            return untracked;
        }
        let Some(colon) = field.iter().position(|&byte| byte == b':') else {
            return untracked;
        };
        let (name, value) = (&field[..colon], trim(&field[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            match digits(value) {
                Some(length) => content_lengths.push(length),
                // hyper answers 400 to an invalid Content-Length.
                None => return untracked,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // hyper looks at each line's last coding; the last line decides.
            let last = value
                .rsplit(|&byte| byte == b',')
                .next()
                .unwrap_or_default();
            transfer_encoding = Some(trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    drop(lines);
    let violation = if bare_line_feed {
        Some(HeadViolation::BareLineFeed)
    } else if transfer_encoding.is_some() && !content_lengths.is_empty() {
        Some(HeadViolation::ContentLengthWithTransferEncoding)
    } else if content_lengths.len() > 1 {
        Some(HeadViolation::DuplicateContentLength)
    } else {
        None
    };
    let body = match (transfer_encoding, content_lengths.first()) {
        // hyper refuses a transfer coding that does not end in chunked, and HTTP/1.0 with one.
        (Some(false), _) => return untracked,
        (Some(true), _) if version != b"HTTP/1.1" => return untracked,
        (Some(true), _) => Body::Chunked,
        (None, Some(&length)) => {
            if content_lengths.iter().any(|&other| other != length) {
                // hyper answers 400 to differing lengths.
                return untracked;
            }
            Body::Length(length)
        }
        (None, None) => Body::Empty,
    };
    Scanned {
        violation,
        // The proxy closes the connection after refusing a violation.
        next: if violation.is_some() {
            Next::Untracked
        } else {
            Next::Body(body)
        },
        upgrade,
    }
}

/// How many of `available` bytes a body with `remaining` bytes to come takes.
fn take(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |remaining| remaining.min(available))
}

/// Optional whitespace trimmed from both ends (RFC 9110 §5.5).
fn trim(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// A `Content-Length` value as hyper reads it: ASCII digits only, no sign, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |length, &byte| {
        if byte.is_ascii_digit() {
            length.checked_mul(10)?.checked_add(u64::from(byte - b'0'))
        } else {
            None
        }
    })
}

fn hex(byte: u8) -> Option<u64> {
    char::from(byte).to_digit(16).map(u64::from)
}

/// Feeds chunked-body bytes; returns the unread rest and the next state: `Some(Some(chunk))`
/// to go on, `Some(None)` when the body ended, `None` where hyper's decoder fails.
fn feed_chunked(mut chunk: Chunk, mut data: &[u8]) -> (&[u8], Option<Option<Chunk>>) {
    while let Some((&byte, rest)) = data.split_first() {
        if let Chunk::Data(remaining) = chunk {
            let taken = take(remaining, data.len());
            data = &data[taken..];
            let remaining = remaining - taken as u64;
            chunk = if remaining == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(remaining)
            };
            continue;
        }
        data = rest;
        let next = match (chunk, byte) {
            (Chunk::Start, _) => hex(byte).map(Chunk::Size),
            (Chunk::Size(size), _) if hex(byte).is_some() => size
                .checked_mul(16)
                .and_then(|size| size.checked_add(hex(byte)?))
                .map(Chunk::Size),
            (Chunk::Size(size) | Chunk::SizeLws(size), b' ' | b'\t') => Some(Chunk::SizeLws(size)),
            (Chunk::Size(size) | Chunk::SizeLws(size), b';') => Some(Chunk::Extension(size)),
            (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b'\r') => {
                Some(Chunk::SizeLf(size))
            }
            (Chunk::Extension(_), b'\n') => None,
            (Chunk::Extension(size), _) => Some(Chunk::Extension(size)),
            (Chunk::SizeLf(0), b'\n') => Some(Chunk::EndCr),
            (Chunk::SizeLf(size), b'\n') => Some(Chunk::Data(size)),
            (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
            (Chunk::DataLf, b'\n') => Some(Chunk::Start),
            (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
            (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
            (Chunk::EndCr | Chunk::Trailer, _) => Some(Chunk::Trailer),
            (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
            (Chunk::EndLf, b'\n') => return (data, Some(None)),
            _ => None,
        };
        match next {
            Some(next) => chunk = next,
            None => return (data, None),
        }
    }
    (data, Some(Some(chunk)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[&[u8]]) -> Vec<FramingEvent> {
        let mut framing = RequestFraming::new(64 * 1024);
        let mut seen = Vec::new();
        for part in input {
            framing.feed(part, &mut |event| seen.push(event));
        }
        seen
    }

    fn verdicts(input: &[&[u8]]) -> Vec<Option<HeadViolation>> {
        events(input)
            .into_iter()
            .filter_map(|event| match event {
                FramingEvent::HeadComplete(violation) => Some(violation),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pipelined_requests_are_followed_through_their_bodies() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: h\r\n\r\n\
POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\n\n\r\n\r\n\r\n0\r\nT: 1\r\n\r\n\
GET /d HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(
            verdicts(&[stream]),
            vec![
                None,
                None,
                None,
                Some(HeadViolation::DuplicateContentLength)
            ]
        );
        // The same bytes one at a time.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdicts(&bytes).len(), 4);
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_not_heads() {
        let body = b"GET /x HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n";
        let mut stream = format!(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        stream.extend_from_slice(b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(verdicts(&[&stream]), vec![None, None]);
    }

    #[test]
    fn ambiguous_heads_are_reported_and_followed_no_further() {
        let cl_te = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(
            events(&[cl_te]),
            vec![
                FramingEvent::HeadStarted,
                FramingEvent::HeadComplete(Some(HeadViolation::ContentLengthWithTransferEncoding)),
                FramingEvent::Untracked
            ]
        );
        let te_cl = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(
            verdicts(&[te_cl]),
            vec![Some(HeadViolation::ContentLengthWithTransferEncoding)]
        );
        let bare = b"GET / HTTP/1.1\nHost: h\r\n\r\n";
        assert_eq!(verdicts(&[bare]), vec![Some(HeadViolation::BareLineFeed)]);
        let bare_end = b"GET / HTTP/1.1\r\nHost: h\r\n\n";
        assert_eq!(
            verdicts(&[bare_end]),
            vec![Some(HeadViolation::BareLineFeed)]
        );
    }

    #[test]
    fn heads_hyper_refuses_stop_the_tracking() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        ] {
            assert_eq!(
                events(&[head]),
                vec![
                    FramingEvent::HeadStarted,
                    FramingEvent::HeadComplete(None),
                    FramingEvent::Untracked
                ],
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn http2_preface_and_upgrades_end_the_tracking() {
        assert_eq!(
            events(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
            vec![
                FramingEvent::HeadStarted,
                FramingEvent::HeadComplete(None),
                FramingEvent::Http2
            ]
        );
        let upgrade = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\nX: y\n\n";
        assert_eq!(verdicts(&[upgrade]), vec![None]);
    }

    /// Follows `input`, then answers the upgrade request; the events after the answer.
    fn answered(
        input: &[u8],
        switched: bool,
        then: &[u8],
    ) -> (Vec<FramingEvent>, Vec<FramingEvent>) {
        let mut framing = RequestFraming::new(100);
        let mut before = Vec::new();
        framing.feed(input, &mut |event| before.push(event));
        let mut after = Vec::new();
        framing.upgrade_answered(switched, &mut |event| after.push(event));
        framing.feed(then, &mut |event| after.push(event));
        (before, after)
    }

    #[test]
    fn a_refused_upgrade_resumes_with_the_bytes_held_meanwhile() {
        let upgrade = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
        let mut input = upgrade.to_vec();
        input.extend_from_slice(b"GET /held HTTP/1.1\nHost: h\r\n\r\n");
        let (before, after) = answered(&input, false, b"GET /later HTTP/1.1\r\n");
        assert_eq!(
            before,
            vec![
                FramingEvent::HeadStarted,
                FramingEvent::HeadComplete(None),
                FramingEvent::UpgradeRequested
            ],
            "what follows an upgrade request waits for its answer"
        );
        assert_eq!(
            after,
            vec![
                FramingEvent::HeadStarted,
                FramingEvent::HeadComplete(Some(HeadViolation::BareLineFeed)),
                FramingEvent::Untracked
            ]
        );
        // Nothing held: the next head is followed as it comes.
        let (_, after) = answered(upgrade, false, b"GET /later HTTP/1.1\r\n");
        assert_eq!(after, vec![FramingEvent::HeadStarted]);
    }

    #[test]
    fn an_upgrade_request_body_is_followed_before_holding() {
        let input = b"POST / HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 20\r\n\r\nGET / HTTP/1.1\n\n\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (before, after) = answered(input, false, b"");
        assert_eq!(before.len(), 3, "{before:?}");
        assert_eq!(
            after,
            vec![FramingEvent::HeadStarted, FramingEvent::HeadComplete(None)]
        );
    }

    #[test]
    fn a_granted_upgrade_ends_the_tracking() {
        let input = b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\n\n";
        let (_, after) = answered(input, true, b"GET / HTTP/1.1\nX: y\n\n");
        assert_eq!(after, vec![FramingEvent::Untracked]);
    }

    #[test]
    fn more_than_a_head_held_is_a_head_too_large() {
        let mut input = b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n".to_vec();
        input.extend_from_slice(&[b'a'; 101]);
        let (_, after) = answered(&input, false, b"more");
        assert_eq!(
            after,
            vec![
                FramingEvent::HeadStarted,
                FramingEvent::HeadTooLarge,
                FramingEvent::Untracked
            ]
        );
    }

    #[test]
    fn a_head_over_the_limit_is_reported() {
        let mut framing = RequestFraming::new(100);
        let mut seen = Vec::new();
        let head = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(200));
        for byte in head.as_bytes().chunks(7) {
            framing.feed(byte, &mut |event| seen.push(event));
        }
        assert!(!framing.is_tracking());
        assert_eq!(
            seen,
            vec![
                FramingEvent::HeadStarted,
                FramingEvent::HeadTooLarge,
                FramingEvent::Untracked
            ]
        );
        // A whole head over the limit in one read.
        let mut framing = RequestFraming::new(100);
        let mut seen = Vec::new();
        framing.feed(format!("{head}\r\n").as_bytes(), &mut |event| {
            seen.push(event)
        });
        assert_eq!(seen[1], FramingEvent::HeadTooLarge);
    }

    #[test]
    fn a_bad_chunk_stops_the_tracking() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n";
        assert_eq!(
            events(&[head]).last(),
            Some(&FramingEvent::Untracked),
            "a size line ending in a bare LF, which hyper refuses"
        );
    }
}
