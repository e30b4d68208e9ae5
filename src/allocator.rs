//! Giving the memory the C allocator has freed back to the system.
//!
//! flotilla allocates through glibc's `malloc`. Measured at 5,000 hosts /
//! 100,000 units (BENCHMARKS.md, "Memory at 5,000 hosts / 100,000 units"),
//! each member held 149–275 MiB of memory it had already freed, beside
//! 289–518 MiB in use, and never shrank after a bulk start: glibc gives
//! memory back on its own only from the top of each heap (past a threshold
//! that grows to 64 MiB), and a free chunk below a live one stays mapped.
//! So every [`TRIM_EVERY`], when more than [`TRIM_ABOVE_BYTES`] are free, the
//! daemon calls `malloc_trim(0)`, glibc's own call that hands whole free
//! pages back to the kernel wherever they are in the heap: followers then
//! ended a 5,000-host run at 367–430 MiB instead of 525–582 MiB (peaks,
//! reached during the bulk start, barely moved).
//!
//! Capping glibc's arenas (`M_ARENA_MAX=2`) was measured too and is not
//! done: it left as much memory free in the arenas (236 against 239 MiB in a
//! follower of the same run), and its idle leader ran at 17.7% of a core
//! against 9.5% (one run each at load 10–12: a hint, not a measurement).
//!
//! Elsewhere (another C library, another OS) this is a no-op.

use std::time::Duration;

/// How often the daemon checks how much freed memory the allocator holds.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Free memory held by the allocator past which the daemon trims.
pub const TRIM_ABOVE_BYTES: usize = 32 * 1024 * 1024;

/// Bytes the allocator holds that nothing uses: free chunks in every arena
/// (`mallinfo2`'s `fordblks`), whether or not their pages were already
/// given back. `None` where that is not known.
pub fn free_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 reads the allocator's statistics under its locks.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Hands every whole free page the allocator holds back to the kernel.
/// Returns whether any was. Takes each arena's lock in turn while it walks
/// that arena's free chunks, so run it off the Raft thread.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim(0) only releases free memory; no pointer the
        // program holds changes.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Every [`TRIM_EVERY`], trims when more than [`TRIM_ABOVE_BYTES`] are
/// free, until the process ends. The check and the trim run on the
/// blocking pool.
///
/// Free chunks stay counted after their pages went back, so once a member
/// has held that much it trims at every check, walking the free lists again
/// (58,000 free chunks in a member at 100,000 units). Not timed on its own:
/// the idle leader's CPU at 5,000 hosts stayed within the spread of runs
/// (16.5% of a core against 17.1% for main in the same session, the same
/// roles).
pub async fn give_back_freed() {
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let pass = tokio::task::spawn_blocking(|| {
            let free = free_bytes()?;
            if free > TRIM_ABOVE_BYTES {
                let started = std::time::Instant::now();
                let released = trim();
                tracing::debug!(
                    "allocator: {} MiB free, trimmed in {:?} (pages released: {released})",
                    free >> 20,
                    started.elapsed()
                );
            }
            Some(())
        })
        .await;
        match pass {
            Ok(Some(())) => {}
            // Not glibc: nothing to do, ever.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("the allocator's trim failed: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_is_counted_and_can_be_trimmed() {
        // Many small blocks (below glibc's mmap threshold, so they come
        // from an arena), then freed: the arena holds them as free chunks.
        let before = free_bytes().expect("glibc reports its free bytes");
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 16 * 1024]).collect();
        let held: usize = blocks.iter().map(Vec::len).sum();
        assert_eq!(held, 64 * 1024 * 1024);
        // The last block stays, pinning the heap's top.
        let last = blocks.into_iter().rev().take(1).collect::<Vec<_>>();
        let freed = free_bytes().expect("glibc reports its free bytes");
        assert!(
            freed >= before + 32 * 1024 * 1024,
            "{freed} bytes free after freeing 64 MiB, {before} before"
        );
        assert!(trim(), "64 MiB below a live block: whole pages to release");
        drop(last);
    }
}
