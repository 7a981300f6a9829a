//! Connection floods after HTTP/2 abuse: a peer whose connection scoretap closed with GOAWAY
//! `ENHANCE_YOUR_CALM` (rapid reset, CVE-2023-44487, or too many stream errors) earns a strike,
//! and its next connections are served one per interval: the interval starts at `--abuse-delay`
//! and doubles with each strike up to [`MAXIMUM_WAIT`]. Connections opened in parallel queue one
//! behind the other (so the peer gets no more connections served by opening more at once), and
//! one that would wait past [`MAXIMUM_QUEUE`] is turned away: held unserved for [`MAXIMUM_WAIT`],
//! then closed (closed at once, it would be retried at once: measured, 40,000 reconnections in
//! four seconds from a slowloris loop). A peer quiet for [`FORGET_AFTER`] is forgotten.
//!
//! Cutting a rapid-reset connection off is not enough on its own: the attacker reconnects at
//! once, and thousands of connections a second (accepted, handshaken, read, cut off) take the CPU
//! that other clients' requests need. RFC 9113 §10.5 ("An endpoint MAY treat activity that is
//! suspicious as a connection error of type ENHANCE_YOUR_CALM") lets a server refuse the
//! activity; this also slows its return. A waiting connection holds one of `--max-connections`,
//! so a peer that opens many at once is bounded by that limit as every client is.
//!
//! The peer is the address the connection comes from: behind a load balancer that does not
//! preserve client addresses, every client of that balancer shares the penalty while one of them
//! attacks. `--abuse-delay 0s` switches it off.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The longest interval between a penalized peer's connections.
pub const MAXIMUM_WAIT: Duration = Duration::from_secs(1);
/// A penalized peer's connection that would wait longer than this is turned away
/// ([`Admission::TurnedAway`]).
pub const MAXIMUM_QUEUE: Duration = Duration::from_secs(5);
/// A peer with no strike for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(10);
/// The most peers remembered; past it the stalest are forgotten first.
pub const MAXIMUM_PEERS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Strikes {
    count: u32,
    last: Instant,
    /// When the peer's next connection may be served.
    next_turn: Instant,
}

/// What happens to a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Served at once (nearly every connection).
    Now,
    /// Served after this wait.
    After(Duration),
    /// Held unserved for [`MAXIMUM_WAIT`], then closed: its peer already has connections
    /// waiting up to [`MAXIMUM_QUEUE`].
    TurnedAway,
}

/// The peers under penalty.
#[derive(Debug)]
pub struct AbusePenalty {
    first_wait: Duration,
    peers: Mutex<HashMap<IpAddr, Strikes>>,
    /// How many peers are remembered, read without the lock (zero nearly always).
    remembered: AtomicUsize,
}

impl AbusePenalty {
    /// Penalties starting at `first_wait`; none at all when it is zero.
    pub fn new(first_wait: Duration) -> Self {
        Self {
            first_wait,
            peers: Mutex::new(HashMap::new()),
            remembered: AtomicUsize::new(0),
        }
    }

    /// When a new connection from `peer` is served, taking its turn.
    pub fn admit(&self, peer: IpAddr) -> Admission {
        if self.remembered.load(Ordering::Acquire) == 0 {
            return Admission::Now;
        }
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let admission = match peers.get_mut(&peer) {
            Some(strikes) if now.duration_since(strikes.last) < FORGET_AFTER => {
                let turn = strikes.next_turn.max(now);
                let wait = turn.duration_since(now);
                if wait > MAXIMUM_QUEUE {
                    Admission::TurnedAway
                } else {
                    strikes.next_turn = turn + self.interval_after(strikes.count);
                    if wait.is_zero() {
                        Admission::Now
                    } else {
                        Admission::After(wait)
                    }
                }
            }
            Some(_) => {
                peers.remove(&peer);
                Admission::Now
            }
            None => Admission::Now,
        };
        self.remembered.store(peers.len(), Ordering::Release);
        admission
    }

    /// Records a strike against `peer`.
    pub fn strike(&self, peer: IpAddr) {
        if self.first_wait.is_zero() {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if peers.len() >= MAXIMUM_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, strikes| now.duration_since(strikes.last) < FORGET_AFTER);
            if peers.len() >= MAXIMUM_PEERS {
                if let Some(stalest) = peers
                    .iter()
                    .min_by_key(|(_, strikes)| strikes.last)
                    .map(|(address, _)| *address)
                {
                    peers.remove(&stalest);
                }
            }
        }
        let strikes = peers.entry(peer).or_insert(Strikes {
            count: 0,
            last: now,
            next_turn: now,
        });
        strikes.count = strikes.count.saturating_add(1);
        strikes.last = now;
        // The next connection waits a whole interval from this strike.
        strikes.next_turn = strikes
            .next_turn
            .max(now + self.interval_after(strikes.count));
        self.remembered.store(peers.len(), Ordering::Release);
    }

    fn interval_after(&self, strikes: u32) -> Duration {
        let doublings = strikes.saturating_sub(1).min(16);
        self.first_wait
            .saturating_mul(1 << doublings)
            .min(MAXIMUM_WAIT)
    }
}

/// Whether a connection ended because scoretap told the peer to calm down: an HTTP/2
/// `ENHANCE_YOUR_CALM` GOAWAY somewhere in the error's chain.
pub fn ended_for_abuse(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn wait(admission: Admission) -> Duration {
        match admission {
            Admission::Now => Duration::ZERO,
            Admission::After(wait) => wait,
            Admission::TurnedAway => Duration::MAX,
        }
    }

    fn near(actual: Duration, expected: Duration) -> bool {
        actual <= expected && expected - actual < Duration::from_millis(20)
    }

    #[test]
    fn intervals_double_per_strike_up_to_the_ceiling_and_only_for_the_peer() {
        let penalty = AbusePenalty::new(Duration::from_millis(50));
        assert_eq!(penalty.admit(PEER), Admission::Now);
        penalty.strike(PEER);
        assert!(near(wait(penalty.admit(PEER)), Duration::from_millis(50)));
        assert_eq!(penalty.admit(OTHER), Admission::Now);
        penalty.strike(PEER);
        // A whole (doubled) interval from the second strike.
        assert!(near(wait(penalty.admit(PEER)), Duration::from_millis(100)));
        for _ in 0..40 {
            penalty.strike(PEER);
        }
        let queued = wait(penalty.admit(PEER));
        assert!(near(queued, MAXIMUM_WAIT), "{queued:?}");
    }

    #[test]
    fn parallel_connections_queue_one_interval_apart_then_are_refused() {
        let penalty = AbusePenalty::new(Duration::from_millis(400));
        penalty.strike(PEER);
        let waits: Vec<Duration> = (0..13).map(|_| wait(penalty.admit(PEER))).collect();
        for (index, pair) in waits.windows(2).take(12).enumerate() {
            if pair[1] != Duration::MAX {
                assert!(
                    near(pair[1] - pair[0], Duration::from_millis(400))
                        || pair[1] - pair[0] == Duration::from_millis(400),
                    "connection {index}: {waits:?}"
                );
            }
        }
        assert!(
            waits.contains(&Duration::MAX),
            "past 5 s they are refused: {waits:?}"
        );
        assert_eq!(penalty.admit(OTHER), Admission::Now);
    }

    #[test]
    fn zero_switches_it_off() {
        let penalty = AbusePenalty::new(Duration::ZERO);
        penalty.strike(PEER);
        assert_eq!(penalty.admit(PEER), Admission::Now);
    }

    #[test]
    fn remembers_a_bounded_number_of_peers() {
        let penalty = AbusePenalty::new(Duration::from_millis(50));
        for index in 0..(MAXIMUM_PEERS as u32 + 10) {
            penalty.strike(IpAddr::V4(std::net::Ipv4Addr::from(index)));
        }
        assert!(penalty.remembered.load(Ordering::Relaxed) <= MAXIMUM_PEERS);
        let newest = IpAddr::V4(std::net::Ipv4Addr::from(MAXIMUM_PEERS as u32 + 9));
        assert!(
            near(wait(penalty.admit(newest)), Duration::from_millis(50)),
            "the newest peer is kept"
        );
    }

    #[test]
    fn finds_enhance_your_calm_in_an_error_chain() {
        let calm = h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM);
        assert!(ended_for_abuse(&calm));
        let other = h2::Error::from(h2::Reason::CANCEL);
        assert!(!ended_for_abuse(&other));
        let io = std::io::Error::other("reset");
        assert!(!ended_for_abuse(&io));
    }
}
