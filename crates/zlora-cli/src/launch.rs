//! `zlora train CONFIG --gpus 0,1,2,3`: the launcher of a one-node data-parallel run. It
//! starts one `zlora train` per GPU (this program, the same arguments without `--gpus`) with
//! torchrun's variables, so each child joins the world as under torchrun; docs/multi-gpu.md.
//!
//! Rank 0's output passes through (it alone writes the run's files and prints the LoRA); the
//! others' stdout is dropped and their stderr lines are prefixed `[rank N]`. A rank that fails
//! stops the others (its peers would wait for it forever inside NCCL), and SIGINT/SIGTERM are
//! forwarded, so that every rank finishes its step and rank 0 checkpoints.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::train::STOPPED;

/// How long the other ranks get to exit after SIGTERM once one rank failed, before SIGKILL:
/// a rank blocked in an all-reduce with a dead peer never reaches its stop check.
const GRACE: Duration = Duration::from_secs(10);

/// Starts one rank per GPU of `gpus` and waits for all of them.
pub fn launch(gpus: &[usize]) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this program to start the ranks")?;
    let args = without_gpus(std::env::args_os().skip(1));
    // The rendezvous port: free a moment ago, and only the ranks on this host use it.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("no free local port for the ranks' rendezvous")?
        .port();
    let ranks = gpus
        .iter()
        .enumerate()
        .map(|(rank, gpu)| {
            let mut cmd = Command::new(&exe);
            cmd.args(&args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", gpus.len().to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env(zlora::device::ENV, format!("cuda:{gpu}"));
            cmd
        })
        .collect();
    supervise(ranks, GRACE)
}

/// This command line's arguments without `--gpus LIST` / `--gpus=LIST`.
fn without_gpus(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        if arg == "--gpus" {
            args.next();
        } else if !arg.to_string_lossy().starts_with("--gpus=") {
            kept.push(arg);
        }
    }
    kept
}

/// One started rank.
struct Rank {
    child: Child,
    exited: Option<ExitStatus>,
    /// The thread copying its stderr with a `[rank N]` prefix (ranks above 0).
    prefixer: Option<JoinHandle<()>>,
}

/// Runs `ranks` (rank N is the N-th command) to the end: forwards SIGINT/SIGTERM, and stops
/// them all (SIGTERM, then SIGKILL after `grace`) as soon as one fails.
fn supervise(ranks: Vec<Command>, grace: Duration) -> anyhow::Result<ExitCode> {
    let signals = Forwarded::install()?;
    let mut running: Vec<Rank> = Vec::new();
    for (rank, cmd) in ranks.into_iter().enumerate() {
        match start(rank, cmd) {
            Ok(started) => running.push(started),
            Err(e) => {
                stop_all(&mut running, Duration::ZERO);
                return Err(e);
            }
        }
    }
    let mut failed = None;
    while running.iter().any(|r| r.exited.is_none()) {
        signals.forward(&running);
        for (rank, r) in running.iter_mut().enumerate() {
            if r.exited.is_none() {
                r.exited = r.child.try_wait().context("cannot wait for a rank")?;
            }
            let stopped = r.exited.and_then(|s| s.code()) == Some(i32::from(STOPPED));
            match r.exited {
                Some(status) if !status.success() && !stopped && failed.is_none() => {
                    failed = Some((rank, status));
                }
                _ => {}
            }
        }
        if failed.is_some() {
            stop_all(&mut running, grace);
        }
        sleep(Duration::from_millis(50));
    }
    for r in &mut running {
        if let Some(prefixer) = r.prefixer.take() {
            let _ = prefixer.join();
        }
    }
    if let Some((rank, status)) = failed {
        bail!(
            "rank {rank} failed ({status}), so the other ranks were stopped; its error is above{}",
            if rank == 0 {
                ""
            } else {
                ", in the lines that start with its [rank N]"
            }
        );
    }
    let stopped = running
        .iter()
        .any(|r| r.exited.and_then(|s| s.code()) == Some(i32::from(STOPPED)));
    Ok(if stopped {
        ExitCode::from(STOPPED)
    } else {
        ExitCode::SUCCESS
    })
}

fn start(rank: usize, mut cmd: Command) -> anyhow::Result<Rank> {
    if rank > 0 {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    // Its own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it
    // once (a second SIGINT would make a rank exit without its checkpoint).
    cmd.process_group(0).stdin(Stdio::null());
    zlora::child::stop_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start rank {rank}"))?;
    let prefixer = child.stderr.take().map(|stderr| {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "[rank {rank}] ");
                let _ = err.write_all(&line);
                let _ = writeln!(err);
            }
        })
    });
    Ok(Rank {
        child,
        exited: None,
        prefixer,
    })
}

/// SIGTERM to every rank still running; after `grace`, SIGKILL to those left.
fn stop_all(ranks: &mut [Rank], grace: Duration) {
    for r in ranks.iter().filter(|r| r.exited.is_none()) {
        signal(&r.child, SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        for r in ranks.iter_mut().filter(|r| r.exited.is_none()) {
            r.exited = r.child.try_wait().ok().flatten();
        }
        if ranks.iter().all(|r| r.exited.is_some()) || Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    for r in ranks.iter_mut().filter(|r| r.exited.is_none()) {
        signal(&r.child, libc::SIGKILL);
        r.exited = r.child.wait().ok();
    }
}

/// `sig` to a rank's process group: the rank and anything it started.
fn signal(child: &Child, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill only sends a signal; the rank leads its own group and has not been
        // reaped, so the group is still its.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// SIGINT and SIGTERM received by the launcher, to pass on to the ranks.
struct Forwarded {
    flags: [(i32, Arc<AtomicBool>); 2],
}

impl Forwarded {
    fn install() -> anyhow::Result<Self> {
        let flags = [SIGINT, SIGTERM].map(|sig| (sig, Arc::new(AtomicBool::new(false))));
        for (sig, flag) in &flags {
            signal_hook::flag::register(*sig, flag.clone())
                .context("cannot install the signal handlers that stop the ranks")?;
        }
        Ok(Self { flags })
    }

    /// Each signal received since the last call, sent once to every running rank.
    fn forward(&self, ranks: &[Rank]) {
        for (sig, flag) in &self.flags {
            if flag.swap(false, Ordering::SeqCst) {
                for r in ranks.iter().filter(|r| r.exited.is_none()) {
                    signal(&r.child, *sig);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that run ranks one at a time: a signal to this process reaches every
    /// launcher in it.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn the_ranks_get_the_arguments_without_gpus() {
        let args = [
            "train",
            "a.toml",
            "--gpus",
            "0,1",
            "--steps",
            "3",
            "--gpus=2,3",
            "--force",
        ];
        let kept = without_gpus(args.iter().map(OsString::from));
        assert_eq!(kept, ["train", "a.toml", "--steps", "3", "--force"]);
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_is_named() {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        // Rank 0 would run for a minute; rank 2 ignores SIGTERM, as a rank blocked in NCCL does.
        let ranks = vec![
            sh("sleep 60"),
            sh("echo broken >&2; exit 3"),
            sh("trap '' TERM; sleep 60"),
        ];
        let e = supervise(ranks, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 1 failed") && e.contains("exit status: 3"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn ranks_that_all_finish_are_a_success_and_a_stopped_one_is_stopped() {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let code = supervise(vec![sh("exit 0"), sh("sleep 0.2")], GRACE).unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let code = supervise(vec![sh("exit 0"), sh("exit 130")], GRACE).unwrap();
        assert_eq!(code, ExitCode::from(STOPPED));
    }

    #[test]
    fn sigterm_to_the_launcher_reaches_every_rank() {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        // Each rank stops cleanly (exit 130) on SIGTERM and would otherwise run for a minute.
        let rank = || sh("trap 'exit 130' TERM; sleep 60 & wait");
        let signal_self = std::thread::spawn(|| {
            sleep(Duration::from_millis(500));
            // SAFETY: sends SIGTERM to this process, whose handler supervise installed.
            unsafe { libc::kill(libc::getpid(), SIGTERM) };
        });
        let started = Instant::now();
        let code = supervise(vec![rank(), rank(), rank()], GRACE).unwrap();
        signal_self.join().unwrap();
        assert_eq!(code, ExitCode::from(STOPPED));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
