//! Raft's runtime: tokio's, with the random numbers (election timeouts)
//! drawn from a generator this crate seeds, so a simulated cluster replays
//! the same elections for the same seed. In the binary it is seeded from the
//! operating system's entropy at first use.

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand08::{RngCore, SeedableRng};
use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

thread_local! {
    static RNG: RefCell<Option<rand08::rngs::StdRng>> = const { RefCell::new(None) };
}

/// Seed this thread's generator (a simulation, before it starts its hubs).
pub fn seed(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = Some(rand08::rngs::StdRng::seed_from_u64(seed)));
}

/// A handle on this thread's generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubRng;

impl HubRng {
    fn with<T>(f: impl FnOnce(&mut rand08::rngs::StdRng) -> T) -> T {
        RNG.with(|r| {
            let mut r = r.borrow_mut();
            let rng = r.get_or_insert_with(rand08::rngs::StdRng::from_entropy);
            f(rng)
        })
    }
}

impl RngCore for HubRng {
    fn next_u32(&mut self) -> u32 {
        Self::with(|r| r.next_u32())
    }
    fn next_u64(&mut self) -> u64 {
        Self::with(|r| r.next_u64())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        Self::with(|r| r.fill_bytes(dest))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand08::Error> {
        Self::with(|r| r.try_fill_bytes(dest))
    }
}

/// tokio, with [`HubRng`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HubRuntime;

type T = TokioRuntime;

impl AsyncRuntime for HubRuntime {
    type JoinError = <T as AsyncRuntime>::JoinError;
    type JoinHandle<O: OptionalSend + 'static> = <T as AsyncRuntime>::JoinHandle<O>;
    type Sleep = <T as AsyncRuntime>::Sleep;
    type Instant = <T as AsyncRuntime>::Instant;
    type TimeoutError = <T as AsyncRuntime>::TimeoutError;
    type Timeout<R, F: Future<Output = R> + OptionalSend> = <T as AsyncRuntime>::Timeout<R, F>;
    type ThreadLocalRng = HubRng;
    type OneshotSender<O: OptionalSend> = <T as AsyncRuntime>::OneshotSender<O>;
    type OneshotReceiverError = <T as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<O: OptionalSend> = <T as AsyncRuntime>::OneshotReceiver<O>;

    fn spawn<F>(future: F) -> Self::JoinHandle<F::Output>
    where
        F: Future + OptionalSend + 'static,
        F::Output: OptionalSend + 'static,
    {
        T::spawn(future)
    }
    fn sleep(duration: Duration) -> Self::Sleep {
        T::sleep(duration)
    }
    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        T::sleep_until(deadline)
    }
    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        T::timeout(duration, future)
    }
    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        T::timeout_at(deadline, future)
    }
    fn is_panic(join_error: &Self::JoinError) -> bool {
        T::is_panic(join_error)
    }
    fn thread_rng() -> HubRng {
        HubRng
    }
    fn oneshot<O: OptionalSend>() -> (Self::OneshotSender<O>, Self::OneshotReceiver<O>) {
        T::oneshot()
    }
}
