//! Giving freed heap back to the kernel. glibc keeps what a burst of work
//! freed in its arenas for reuse; an agent that has gone quiet should not
//! hold it (its idle RSS is what every node pays).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often quiet is checked for.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Largest allocation served from glibc's arenas; larger ones get their
/// own mapping, returned to the kernel when freed. Above the biggest
/// buffers the data path allocates (HBONE reads and the frames h2 reads
/// whole: 128 KiB between agents), so moving bytes maps nothing.
const MMAP_THRESHOLD: i32 = 1024 * 1024;
/// Free space at the top of an arena beyond which `free` gives it back.
const TRIM_THRESHOLD: i32 = 1024 * 1024;

/// Fixes glibc's allocator thresholds; call early, before the runtime.
///
/// By default glibc raises both thresholds each time it frees a large
/// mapped block (up to 32 MiB and 64 MiB): after startup freed the BTF
/// parse's buffers, every worker thread's arena kept up to that much free
/// space at its top, which `malloc_trim` does not release for arenas other
/// than the main one. Setting them turns the adjustment off. A no-op
/// elsewhere (musl).
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    for (parameter, value) in [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        // SAFETY: mallopt only changes allocator parameters (under the
        // allocator's own lock).
        unsafe { libc::mallopt(parameter, value) };
    }
}

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
