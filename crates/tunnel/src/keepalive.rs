//! HTTP/2 keepalive for the agent link, whose both ends run on the h2 crate
//! directly (hyper had this built in): a PING every interval, and the
//! connection given up when one is not answered in time.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub(crate) struct Keepalive {
    pings: ::h2::PingPong,
    every: Duration,
    timeout: Duration,
    next: Pin<Box<Sleep>>,
    pong_by: Option<Instant>,
}

impl Keepalive {
    /// None when `every` is zero (keepalive off) or the connection's ping
    /// handle was already taken.
    pub fn new(pings: Option<::h2::PingPong>, every: Duration, timeout: Duration) -> Option<Self> {
        if every.is_zero() {
            return None;
        }
        Some(Keepalive {
            pings: pings?,
            every,
            timeout,
            next: Box::pin(tokio::time::sleep(every)),
            pong_by: None,
        })
    }

    /// Resolves only when a PING went unanswered (or could not be sent),
    /// with why. Cancel-safe: meant for a `select!` beside the connection,
    /// which must be polled for the answer to arrive.
    pub async fn failed(&mut self) -> &'static str {
        loop {
            match self.pong_by {
                None => {
                    self.next.as_mut().await;
                    if self.pings.send_ping(::h2::Ping::opaque()).is_err() {
                        return "keepalive ping could not be sent";
                    }
                    self.pong_by = Some(Instant::now() + self.timeout);
                }
                Some(by) => {
                    tokio::select! {
                        r = std::future::poll_fn(|cx| self.pings.poll_pong(cx)) => {
                            if r.is_err() {
                                return "keepalive ping failed";
                            }
                            self.pong_by = None;
                            self.next.as_mut().reset(Instant::now() + self.every);
                        }
                        _ = tokio::time::sleep_until(by) => return "keepalive ping not answered",
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that answers pings keeps the connection; one that stops
    /// answering (its connection no longer driven) is found after one
    /// interval plus the timeout. Time is paused: no waiting.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_ping_is_reported_and_answered_ones_are_not() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = ::h2::server::Builder::new()
                .handshake::<_, bytes::Bytes>(b)
                .await
                .unwrap();
            // Answers pings for a while, then stops being driven.
            let _ = tokio::time::timeout(Duration::from_secs(95), conn.accept()).await;
            conn
        });
        let (_send, mut conn) = ::h2::client::Builder::new()
            .handshake::<_, bytes::Bytes>(a)
            .await
            .unwrap();
        let start = Instant::now();
        let mut ka = Keepalive::new(
            conn.ping_pong(),
            Duration::from_secs(30),
            Duration::from_secs(20),
        )
        .unwrap();
        let why = tokio::select! {
            w = ka.failed() => w,
            r = &mut conn => panic!("connection ended: {r:?}"),
        };
        assert_eq!(why, "keepalive ping not answered");
        // Pings at 30, 60, 90 s were answered; the one at 120 s was not.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(140) && took < Duration::from_secs(150),
            "{took:?}"
        );
        drop(server);
        assert!(
            Keepalive::new(None, Duration::from_secs(1), Duration::from_secs(1)).is_none()
                && Keepalive::new(conn.ping_pong(), Duration::ZERO, Duration::from_secs(1))
                    .is_none()
        );
    }
}
