//! Allocator settings for the process.
//!
//! candle allocates a fresh buffer for every op's output. With glibc's defaults, buffers above
//! a threshold that starts at 128 KiB are mmap-ed and unmapped again, and freed memory above
//! the top of the heap is returned to the system as soon as it exceeds twice that threshold;
//! either way the next op's buffer arrives as fresh pages and pays a page fault per 4 KiB.
//! On the CPU that was about an eighth of the transformer's time on a small model.

/// Buffers up to this size come from the heap (glibc's own ceiling for its moving threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Freed memory at the top of the heap is kept up to this size.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 128 << 20;

/// Keeps freed buffers in the heap for reuse instead of handing them back to the system.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's tuning parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
