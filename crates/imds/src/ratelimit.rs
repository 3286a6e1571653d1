//! Per-pod token bucket. Each pod's bucket lives in that pod's entry, so it
//! is created and dropped with the pod; a keyed limiter crate would keep a
//! second map of pods that must be kept in step with the first.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate_per_sec` of 0 means unlimited.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate_per_sec,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub fn try_take(&self) -> bool {
        if self.rate_per_sec <= 0.0 {
            return true;
        }
        let mut state = self.state.lock().expect("bucket poisoned");
        let now = Instant::now();
        let refill = now.duration_since(state.1).as_secs_f64() * self.rate_per_sec;
        state.0 = (state.0 + refill).min(self.burst);
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse() {
        let bucket = TokenBucket::new(0.001, 3);
        assert!((0..3).all(|_| bucket.try_take()));
        assert!(!bucket.try_take());
        assert!((0..100).all(|_| TokenBucket::new(0.0, 1).try_take()));
    }
}
