//! Child processes of this binary (the web app's jobs, the ranks of a multi-GPU run, the arms
//! of a sweep): tied to their parent's life, and stopped by SIGTERM.

use std::process::Command;

/// The child gets SIGTERM when its parent goes away, even by SIGKILL, so that it stops cleanly
/// with a checkpoint instead of running on unseen, holding a GPU and its output folder's lock.
#[cfg(target_os = "linux")]
pub fn stop_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Elsewhere the parent's own signal handling stops its children.
#[cfg(not(target_os = "linux"))]
pub fn stop_with_parent(_cmd: &mut Command) {}

/// SIGTERM to the child `pid`: zlora's commands answer it with a clean stop (a training
/// finishes its step and checkpoints).
pub fn terminate(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}
