//! Timers that are reused from one request to the next, for the two deadlines every request
//! has and almost never reaches: hyper's header-read timeout (the slowloris guard, armed each
//! time a keep-alive connection waits for its next request head) and the upstream
//! `request_timeout`.
//!
//! A new tokio timer is put into the runtime's timer wheel when it is first polled and taken out
//! when it is dropped: a lock and a list operation each way, for every request. A timer that is
//! reset to a later deadline while it waits is instead updated in place, with one atomic
//! compare-and-swap; the wheel moves it to its new slot only when the old deadline comes round.
//! A [`SleepPool`] therefore keeps the timers that requests are done with and resets one for the
//! next request, so that a busy connection touches the wheel about once per timeout instead of
//! once per request. The deadlines themselves are exactly what they were: every timer handed out
//! is reset to the deadline it was asked for.
//!
//! A pooled timer still holds the waker of the task that last polled it, until it is reused or
//! its old deadline comes: then the wheel fires it, which wakes that task once (a spurious poll
//! that finds nothing to do, or nothing at all if the task has finished) and lets go of it. So
//! a finished connection's task can stay in memory for up to one timeout after it ends, for at
//! most [`MAX_IDLE`] of them. (Polling the timer once with a waker that does nothing would let
//! go at once, but tokio's timers panic when polled while the runtime shuts down, which is when
//! many of them are dropped.)

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How many idle timers a pool keeps, at most (a tokio timer is about 100 bytes, and it may hold
/// a finished task's memory until its old deadline). Beyond it, timers are dropped as usual.
const MAX_IDLE: usize = 1024;

/// Timers that requests are done with, ready to be reset for the next one. Clones share the pool.
#[derive(Debug, Clone, Default)]
pub(crate) struct SleepPool {
    idle: Arc<Mutex<Vec<Pin<Box<tokio::time::Sleep>>>>>,
}

impl SleepPool {
    /// A timer that fires at `deadline`: a pooled one reset to it, or a new one.
    pub(crate) fn sleep_until(&self, deadline: tokio::time::Instant) -> PooledSleep {
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let inner = match reused {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        PooledSleep {
            inner: Some(inner),
            pool: self.clone(),
        }
    }

    /// Idle timers held (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A timer from a [`SleepPool`]; goes back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct PooledSleep {
    /// `Some` until dropped.
    inner: Option<Pin<Box<tokio::time::Sleep>>>,
    pool: SleepPool,
}

impl PooledSleep {
    /// Moves the deadline (hyper's `Timer::reset`).
    pub(crate) fn reset(&mut self, deadline: tokio::time::Instant) {
        if let Some(inner) = self.inner.as_mut() {
            inner.as_mut().reset(deadline);
        }
    }
}

impl Future for PooledSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.inner.as_mut() {
            Some(inner) => inner.as_mut().poll(cx),
            // Only `drop` takes it.
            None => Poll::Ready(()),
        }
    }
}

impl Drop for PooledSleep {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let mut idle = self
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(inner);
        }
    }
}

impl hyper::rt::Sleep for PooledSleep {}

/// hyper's timer (header-read timeout, HTTP/2 keep-alive pings) on a [`SleepPool`].
#[derive(Debug, Clone, Default)]
pub(crate) struct PooledTimer {
    pool: SleepPool,
}

impl hyper::rt::Timer for PooledTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(
            self.pool
                .sleep_until(tokio::time::Instant::now() + duration),
        )
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.pool.sleep_until(deadline.into()))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<PooledSleep>() {
            Some(pooled) => Pin::into_inner(pooled).reset(new_deadline.into()),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_fires_at_its_new_deadline_and_not_at_its_old_one() {
        let pool = SleepPool::default();
        let start = tokio::time::Instant::now();
        {
            let mut first = pool.sleep_until(start + Duration::from_secs(1));
            // Polled once, so that it is in the wheel when it goes back to the pool.
            assert!(futures_poll_once(&mut first).is_pending());
        }
        assert_eq!(pool.idle(), 1);
        let second = pool.sleep_until(start + Duration::from_secs(5));
        assert_eq!(pool.idle(), 0, "the pooled timer is reused");
        let fired = tokio::time::timeout(Duration::from_secs(4), second).await;
        assert!(fired.is_err(), "fired at the old deadline");
        let second = pool.sleep_until(start + Duration::from_secs(5));
        second.await;
        assert_eq!(tokio::time::Instant::now() - start, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_whose_deadline_passed_in_the_pool_waits_again_when_reused() {
        let pool = SleepPool::default();
        let start = tokio::time::Instant::now();
        pool.sleep_until(start + Duration::from_millis(10)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let later = tokio::time::Instant::now() + Duration::from_secs(2);
        let reused = pool.sleep_until(later);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), reused)
                .await
                .is_err(),
            "an elapsed timer was handed out as elapsed"
        );
        pool.sleep_until(later).await;
        assert_eq!(tokio::time::Instant::now(), later);
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_reset_moves_the_deadline() {
        use hyper::rt::Timer as _;
        let timer = PooledTimer::default();
        let start = timer.now();
        let mut sleep = timer.sleep(Duration::from_secs(1));
        timer.reset(&mut sleep, start + Duration::from_secs(3));
        assert!(
            tokio::time::timeout(Duration::from_secs(2), &mut sleep)
                .await
                .is_err(),
            "fired at the deadline before the reset"
        );
        sleep.await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pooled_timer_lets_go_of_the_last_task_at_its_old_deadline() {
        let pool = SleepPool::default();
        let task = Arc::new(CountingWaker::default());
        let waker = Waker::from(task.clone());
        {
            let mut sleep = pool.sleep_until(tokio::time::Instant::now() + Duration::from_secs(1));
            let poll = Pin::new(&mut sleep).poll(&mut Context::from_waker(&waker));
            assert!(poll.is_pending());
        }
        drop(waker);
        assert_eq!(pool.idle(), 1);
        assert_eq!(Arc::strong_count(&task), 2, "held until the old deadline");
        // The old deadline passes in the pool: the task is woken once and let go.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(task.wakes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            Arc::strong_count(&task),
            1,
            "still held after the old deadline"
        );
        // Reused afterwards, it waits for its new deadline.
        let later = tokio::time::Instant::now() + Duration::from_secs(3);
        pool.sleep_until(later).await;
        assert_eq!(tokio::time::Instant::now(), later);
    }

    #[derive(Default)]
    struct CountingWaker {
        wakes: std::sync::atomic::AtomicUsize,
    }

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds");
        runtime.block_on(async {
            let pool = SleepPool::default();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let held: Vec<_> = (0..MAX_IDLE + 10)
                .map(|_| pool.sleep_until(deadline))
                .collect();
            drop(held);
            assert_eq!(pool.idle(), MAX_IDLE);
        });
    }

    /// Polls `f` once with a waker that does nothing.
    fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }
}
