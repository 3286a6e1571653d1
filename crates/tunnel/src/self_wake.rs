//! A future that wakes its own task while it is being polled is polled
//! again in place, instead of going back to tokio's scheduler.
//!
//! Why: the tunnel's busy tasks (an agent link's connection, a moved endpoint
//! reader inside it) wake themselves all the time: h2
//! wakes its connection task when a stream queues a frame, and that stream
//! runs inside the same task. tokio answers a task notified during its own
//! poll by putting it at the back of the run queue and waking a parked
//! sibling worker to share the load (a futex wake; the sibling searches,
//! often steals the task to the other CPU, and wakes the next one as it
//! stops searching). On two CPUs shared with the client and the backend,
//! those hand-offs were the main thing our processes did that the TLS floor's
//! relays did not (futex calls per 2 s: 9941 in the server and 3188 in the
//! agent against 6 and 196; see docs/tunnel-benchmarks.md). No tokio setting
//! turns this off, so the wake is kept from reaching tokio instead.
//!
//! Fairness stays tokio's: the re-polls stop when the task's cooperative
//! budget is used up or after `MAX_REPOLLS`, and then the wake goes to tokio
//! as before. A wake from anywhere else (another task, another thread, the
//! I/O driver) goes to tokio unchanged, and `tokio::task::yield_now` still
//! yields (tokio defers its wake until after the poll). `repoll_task` is
//! the yield for code that only wants its task's other futures polled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::task::{ArcWake, AtomicWaker, waker_ref};

/// Polls in a row, at most, before a self-wake goes to tokio after all.
const MAX_REPOLLS: usize = 8;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN_WHILE_POLLING: u8 = 2;

/// `inner`, whose wakes during its own poll are served by polling again.
pub(crate) fn absorb_self_wakes<F: Future>(inner: F) -> AbsorbSelfWakes<F> {
    AbsorbSelfWakes {
        inner: Box::pin(inner),
        waker: Arc::new(Waker {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        }),
    }
}

pub(crate) struct AbsorbSelfWakes<F> {
    inner: Pin<Box<F>>,
    waker: Arc<Waker>,
}

/// The waker `inner` sees.
struct Waker {
    state: AtomicU8,
    /// The task's own waker, for wakes outside a poll.
    task: AtomicWaker,
}

impl ArcWake for Waker {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        match arc_self.state.compare_exchange(
            POLLING,
            WOKEN_WHILE_POLLING,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // Being polled: the poll loop sees the flag and polls again.
            Ok(_) | Err(WOKEN_WHILE_POLLING) => {}
            Err(_) => arc_self.task.wake(),
        }
    }
}

impl<F: Future> Future for AbsorbSelfWakes<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.waker.task.register(cx.waker());
        let waker = waker_ref(&this.waker);
        let mut inner_cx = Context::from_waker(&waker);
        for _ in 0..MAX_REPOLLS {
            this.waker.state.store(POLLING, Ordering::Release);
            let polled = this.inner.as_mut().poll(&mut inner_cx);
            let state = this.waker.state.swap(IDLE, Ordering::AcqRel);
            if polled.is_ready() {
                return polled;
            }
            if state != WOKEN_WHILE_POLLING {
                return Poll::Pending;
            }
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        // Out of budget or of re-polls: let tokio run something else first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Returns to the enclosing task once, so it polls its other futures
/// (for the agent's connection task: h2's writes) before this one goes on.
/// Inside `absorb_self_wakes` that is a re-poll, not a trip through the
/// scheduler; outside, it is a plain yield.
pub(crate) async fn repoll_task() {
    let mut woke = false;
    std::future::poll_fn(|cx| {
        if woke {
            return Poll::Ready(());
        }
        woke = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; wakes itself during the first `self_wakes` of
    /// them, then finishes on the poll after `done_after`.
    struct Probe {
        polls: Arc<AtomicUsize>,
        self_wakes: usize,
        done_after: usize,
    }

    impl Future for Probe {
        type Output = usize;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            let n = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
            if n > self.done_after {
                return Poll::Ready(n);
            }
            if n <= self.self_wakes {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    /// A future that wakes itself is polled again within the same outer
    /// poll, so tokio never sees the wake; one that does not is left alone.
    #[test]
    fn a_self_wake_is_a_repoll_not_a_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let mut fut = absorb_self_wakes(Probe {
            polls: polls.clone(),
            self_wakes: 3,
            done_after: 100,
        });
        let (polled, outer) = poll_once(&mut fut);
        assert!(polled.is_pending());
        // Polls 1-3 woke themselves, poll 4 did not: four polls, no wake.
        assert_eq!(polls.load(Ordering::SeqCst), 4);
        assert_eq!(outer.wakes.load(Ordering::SeqCst), 0);
    }

    /// A wake from outside a poll reaches the task's own waker.
    #[test]
    fn a_wake_between_polls_reaches_the_task() {
        let stored = Arc::new(std::sync::Mutex::new(None::<std::task::Waker>));
        let mut fut = absorb_self_wakes({
            let stored = stored.clone();
            std::future::poll_fn(move |cx| {
                *stored.lock().unwrap() = Some(cx.waker().clone());
                Poll::<()>::Pending
            })
        });
        let (polled, outer) = poll_once(&mut fut);
        assert!(polled.is_pending());
        assert_eq!(outer.wakes.load(Ordering::SeqCst), 0);
        stored.lock().unwrap().take().unwrap().wake();
        assert_eq!(outer.wakes.load(Ordering::SeqCst), 1);
    }

    /// A future that keeps waking itself gets `MAX_REPOLLS` polls, then
    /// the wake goes to the task, so the scheduler can run others.
    #[test]
    fn endless_self_wakes_are_bounded() {
        let polls = Arc::new(AtomicUsize::new(0));
        let mut fut = absorb_self_wakes(Probe {
            polls: polls.clone(),
            self_wakes: usize::MAX,
            done_after: usize::MAX,
        });
        let (polled, outer) = poll_once(&mut fut);
        assert!(polled.is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), MAX_REPOLLS);
        assert_eq!(outer.wakes.load(Ordering::SeqCst), 1);
    }

    /// Inside tokio, a task out of cooperative budget yields at once.
    #[tokio::test]
    async fn an_exhausted_budget_yields() {
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        let fut = absorb_self_wakes(std::future::poll_fn(move |cx| {
            let n = p.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                // Use the whole budget, then wake ourselves.
                while tokio::task::coop::has_budget_remaining() {
                    let _ = std::pin::pin!(tokio::task::consume_budget()).poll(
                        &mut Context::from_waker(futures_util::task::noop_waker_ref()),
                    );
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(n)
        }));
        // The second poll comes from tokio, after the yield, not from a
        // re-poll inside the first.
        let mut fut = std::pin::pin!(fut);
        let mut outer_polls = 0;
        let out = std::future::poll_fn(|cx| {
            outer_polls += 1;
            fut.as_mut().poll(cx)
        })
        .await;
        assert_eq!((out, outer_polls), (1, 2));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    /// Polls `fut` once, as a task whose waker counts its wakes.
    fn poll_once<F: Future>(fut: &mut AbsorbSelfWakes<F>) -> (Poll<F::Output>, Arc<CountingWaker>) {
        let outer = Arc::new(CountingWaker::default());
        let waker = futures_util::task::waker(outer.clone());
        let polled = Pin::new(fut).poll(&mut Context::from_waker(&waker));
        (polled, outer)
    }

    #[derive(Default)]
    struct CountingWaker {
        wakes: AtomicUsize,
    }
    impl ArcWake for CountingWaker {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.wakes.fetch_add(1, Ordering::SeqCst);
        }
    }
}
