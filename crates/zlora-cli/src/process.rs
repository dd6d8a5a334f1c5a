//! Process-wide settings for running candle on the CPU, applied once at start-up before any
//! thread exists. Each measurably sped up `zlora generate` on a small model (see
//! docs/benchmarks.md); an explicit environment setting from the user is left alone.

/// Keeps freed buffers in glibc's heap for reuse instead of handing them back to the system.
///
/// candle allocates a fresh buffer for every op's output. With glibc's defaults, buffers above
/// a threshold that starts at 128 KiB are mmap-ed and unmapped again, and freed memory above
/// the top of the heap is returned to the system as soon as it exceeds twice that threshold;
/// either way the next op's buffer arrives as fresh pages and pays a page fault per 4 KiB.
/// That was about an eighth of the transformer's CPU time.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's tuning parameters.
    unsafe {
        // Buffers up to glibc's own ceiling for its moving threshold come from the heap, and
        // up to 128 MiB of freed memory stay at its top.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Lets the workers of candle's elementwise thread pool sleep as soon as they are idle.
///
/// By default they busy-wait 25 000 spins for the next op first. Beside rayon's matmul pool
/// that keeps more threads running than there are cores, and on a machine whose cores are
/// shared with other work the spinning took more CPU time than the model itself.
pub fn park_idle_workers() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        std::env::set_var(SPIN_LIMIT, "0");
    }
}
