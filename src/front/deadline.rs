//! Time limits on the driver's socket operations that cost nothing when the operation is
//! done at once.
//!
//! `tokio::time::timeout` reads the clock and sets up a timer (registered on its first wait,
//! dropped afterwards) for every call, even when the wrapped write completes on its first
//! poll, which on a loopback or LAN socket with room in its buffer is nearly always.
//! [`within`] polls the operation once first and only then sets a timer. For writes, flushes
//! and connects; reads that usually wait keep `tokio::time::timeout` (`within` would poll them
//! twice). Profile of the cached-token path: timers and clock reads were about 4 % of the
//! gateway's samples (bench/README.md).

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// `fut`'s output, or `None` when it has not finished `limit` after it first had to wait.
pub async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(out) => Some(out),
        Poll::Pending => tokio::time::timeout(limit, fut).await.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_operation_done_at_once_or_in_time_passes_and_a_late_one_does_not() {
        assert_eq!(within(Duration::from_secs(1), async { 7 }).await, Some(7));
        let slow = |d| async move {
            tokio::time::sleep(d).await;
            1
        };
        assert_eq!(
            within(Duration::from_secs(1), slow(Duration::from_millis(999))).await,
            Some(1)
        );
        assert_eq!(
            within(Duration::from_secs(1), slow(Duration::from_millis(1001))).await,
            None
        );
        // Never ready: the limit still ends it.
        assert_eq!(
            within(Duration::from_secs(5), std::future::pending::<()>()).await,
            None
        );
    }
}
