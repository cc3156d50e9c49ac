//! Giving freed heap back to the kernel. glibc keeps what a burst of work
//! freed in its arenas for reuse; an agent that has gone quiet should not
//! hold it (its idle RSS is what every node pays).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often quiet is checked for.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Releases free heap memory now (a no-op where the allocator returns it
/// by itself: musl, of the static image, has no malloc_trim).
pub fn release() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Releases free heap once activity has stopped: when `activity` (any
/// number that changes as connections come and go) changed during one
/// check period and not during the next. Steady traffic and a quiet agent
/// cost nothing; each burst ends with one release.
pub async fn release_when_quiet(activity: impl Fn() -> u64, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    let mut last = activity();
    let mut busy = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = activity();
        match (now != last, busy) {
            (true, _) => busy = true,
            (false, true) => {
                release();
                busy = false;
            }
            (false, false) => {}
        }
        last = now;
    }
}
