//! Where a data-parallel worker stands, and how the workers agree on one communicator.
//!
//! A launcher (`zlora train --gpus`, torchrun, Slurm's srun) starts one process per GPU and
//! tells each its place through environment variables: torchrun's `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, or Slurm's `SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID` and `SLURM_JOB_NODELIST` (whose first host is the root). [`World::from_env`]
//! reads them; [`World::share_id`] then hands rank 0's opaque communicator id (NCCL's unique
//! id) to every other rank over one TCP connection each. Only this id travels over TCP; the
//! gradients go through the communicator it opens.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The bytes of a communicator id (NCCL's `ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// The root's port when neither `MASTER_PORT` nor a launcher sets one (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// How long the ranks wait for each other at the rendezvous: nodes of one Slurm job can start
/// minutes apart, but a rank that never comes must end the run, not hang it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// What a rank says first when it connects: this tag, its rank and the world size it expects.
const HELLO_TAG: &[u8; 4] = b"zlr1";

/// This process's place among the data-parallel workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// The rank's place on its node: which GPU it takes when `ZLORA_DEVICE` does not say.
    pub local_rank: usize,
    /// Where rank 0 listens: a host name or address, and a port.
    pub root_host: String,
    pub root_port: u16,
}

impl World {
    /// The world the launcher described, or `None` when no launcher variables are set (a
    /// plain run). torchrun's variables win over Slurm's (torchrun inside a Slurm job);
    /// `MASTER_ADDR` and `MASTER_PORT` override Slurm's root in any case.
    pub fn from_env(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<World>> {
        let world = if var("WORLD_SIZE").is_some() {
            Self::torchrun(var)?
        } else if var("SLURM_NTASKS").is_some() {
            Self::slurm(var)?
        } else {
            return Ok(None);
        };
        if world.rank >= world.world_size || world.world_size == 0 {
            return Err(Error::Invalid(format!(
                "rank {} of a world of {}: a rank is 0 to the world size - 1; check the \
                 launcher's variables (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)",
                world.rank, world.world_size
            )));
        }
        Ok(Some(world))
    }

    fn torchrun(var: &dyn Fn(&str) -> Option<String>) -> Result<World> {
        const BY_HAND: &str = "(torchrun sets it; by hand, set it for every process)";
        let mut root_port = port(var)?;
        // torchrun's own store already listens on MASTER_PORT when it shares it with its
        // workers; zlora's rank 0 takes the next port.
        if var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") {
            root_port = root_port.checked_add(1).ok_or_else(|| {
                Error::Invalid(
                    "MASTER_PORT=65535 is torchrun's store, and zlora listens on the next \
                     port: give torchrun a lower --master-port"
                        .into(),
                )
            })?;
        }
        Ok(World {
            rank: number(var, "RANK", BY_HAND)?,
            world_size: number(var, "WORLD_SIZE", BY_HAND)?,
            local_rank: number(var, "LOCAL_RANK", BY_HAND)?,
            root_host: var("MASTER_ADDR").ok_or_else(|| {
                Error::Invalid(format!(
                    "MASTER_ADDR is not set: set it to rank 0's host name or address {BY_HAND}"
                ))
            })?,
            root_port,
        })
    }

    fn slurm(var: &dyn Fn(&str) -> Option<String>) -> Result<World> {
        const IN_SRUN: &str = "(srun sets it: start zlora with srun, one task per GPU)";
        let root_host = match var("MASTER_ADDR") {
            Some(host) => host,
            None => {
                let nodes = var("SLURM_JOB_NODELIST").ok_or_else(|| {
                    Error::Invalid(format!(
                        "SLURM_JOB_NODELIST is not set {IN_SRUN}, or set MASTER_ADDR to rank 0's host"
                    ))
                })?;
                first_host(&nodes).map_err(|why| {
                    Error::Invalid(format!(
                        "SLURM_JOB_NODELIST={nodes}: {why}; set MASTER_ADDR to rank 0's host"
                    ))
                })?
            }
        };
        Ok(World {
            rank: number(var, "SLURM_PROCID", IN_SRUN)?,
            world_size: number(var, "SLURM_NTASKS", IN_SRUN)?,
            local_rank: number(var, "SLURM_LOCALID", IN_SRUN)?,
            root_host,
            root_port: port(var)?,
        })
    }

    /// The CUDA GPU this rank takes when `ZLORA_DEVICE` does not say: its `LOCAL_RANK`, or
    /// GPU 0 when the launcher left it a single visible GPU (`CUDA_VISIBLE_DEVICES`, as Slurm
    /// sets it with `--gpus-per-task=1`).
    pub fn gpu(&self, cuda_visible_devices: Option<&str>) -> usize {
        match cuda_visible_devices {
            Some(list) if list.split(',').filter(|d| !d.trim().is_empty()).count() == 1 => 0,
            _ => self.local_rank,
        }
    }

    /// Rank 0 makes the id (`make_id`, called only there) and sends it to every other rank;
    /// the others fetch it. Returns once every rank has connected, so that the communicator
    /// that the id opens next finds all of them; a rank that does not come within `timeout`
    /// is an error on every rank, never a hang.
    pub fn share_id(
        &self,
        make_id: impl FnOnce() -> Result<[u8; ID_BYTES]>,
        timeout: Duration,
    ) -> Result<[u8; ID_BYTES]> {
        if self.rank == 0 {
            // Every interface: MASTER_ADDR may name this host by an address that resolves
            // to a loopback one here (Debian's 127.0.1.1) while the peers reach it from outside.
            let listener =
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, self.root_port)).map_err(|e| {
                    Error::Invalid(format!(
                        "rank 0 cannot listen on port {} ({e}): set MASTER_PORT to a free port \
                         (the same for every rank)",
                        self.root_port
                    ))
                })?;
            let id = make_id()?;
            send_id(&listener, &id, self.world_size, timeout)?;
            Ok(id)
        } else {
            let root = format!("{}:{}", self.root_host, self.root_port);
            fetch_id(&root, self.rank, self.world_size, timeout)
        }
    }
}

/// A variable that must hold a non-negative whole number.
fn number(var: &dyn Fn(&str) -> Option<String>, name: &str, fix: &str) -> Result<usize> {
    let value = var(name).ok_or_else(|| Error::Invalid(format!("{name} is not set {fix}")))?;
    value.trim().parse().map_err(|_| {
        Error::Invalid(format!(
            "{name}={value}: expected a whole number 0 or more {fix}"
        ))
    })
}

fn port(var: &dyn Fn(&str) -> Option<String>) -> Result<u16> {
    match var("MASTER_PORT") {
        None => Ok(DEFAULT_PORT),
        Some(value) => match value.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(Error::Invalid(format!(
                "MASTER_PORT={value}: expected a port number 1-65535, the same for every rank"
            ))),
        },
    }
}

/// The first host of a Slurm host list: `gpu[01-04,07],login1` → `gpu01`,
/// `rack[1-2]-n[3,5]` → `rack1-n3`. Only the first entry is expanded, as only it is needed.
pub fn first_host(list: &str) -> std::result::Result<String, String> {
    let mut host = String::new();
    let mut chars = list.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let group: String = chars.by_ref().take_while(|&c| c != ']').collect();
                let first = group.split(',').next().unwrap_or_default();
                let start = first.split('-').next().unwrap_or_default();
                if start.is_empty() || !start.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("'[{group}' is not a range of node numbers"));
                }
                host.push_str(start);
            }
            ']' => return Err("a ']' without its '['".into()),
            c => host.push(c),
        }
    }
    if host.is_empty() {
        return Err("no host in the list".into());
    }
    Ok(host)
}

/// Rank 0's side: waits for the other `world_size - 1` ranks to connect and say who they are,
/// then sends each the id.
pub fn send_id(
    listener: &TcpListener,
    id: &[u8; ID_BYTES],
    world_size: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let io = |e: std::io::Error| Error::Invalid(format!("rendezvous (rank 0): {e}"));
    listener.set_nonblocking(true).map_err(io)?;
    let mut peers: Vec<TcpStream> = Vec::new();
    let mut arrived = BTreeSet::new();
    while arrived.len() + 1 < world_size {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..world_size)
                        .filter(|r| !arrived.contains(r))
                        .map(|r| r.to_string())
                        .collect();
                    return Err(Error::Invalid(format!(
                        "rank 0 waited {timeout:?} on port {} for ranks {} that never connected: \
                         start every rank (under Slurm with srun, one task per GPU) and check \
                         that they reach this host (MASTER_ADDR, firewalls)",
                        listener.local_addr().map(|a| a.port()).unwrap_or_default(),
                        missing.join(", ")
                    )));
                }
                sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(io(e)),
        };
        stream.set_nonblocking(false).map_err(io)?;
        let rank = hello_from(&mut stream, world_size, deadline)?;
        if !arrived.insert(rank) {
            return Err(Error::Invalid(format!(
                "rank {rank} connected twice: every process needs its own rank (RANK or \
                 SLURM_PROCID)"
            )));
        }
        peers.push(stream);
    }
    for mut peer in peers {
        peer.write_all(id).map_err(io)?;
    }
    Ok(())
}

/// The rank a connecting peer announces, checked against this world.
fn hello_from(stream: &mut TcpStream, world_size: usize, deadline: Instant) -> Result<usize> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut hello = [0u8; 12];
    stream
        .set_read_timeout(Some(remaining.max(Duration::from_millis(1))))
        .and_then(|()| stream.read_exact(&mut hello))
        .map_err(|e| Error::Invalid(format!("rendezvous (rank 0): a peer said nothing ({e})")))?;
    let field = |at: usize| u32::from_le_bytes(hello[at..at + 4].try_into().unwrap()) as usize;
    if &hello[..4] != HELLO_TAG {
        return Err(Error::Invalid(
            "rendezvous (rank 0): something other than a zlora rank connected to MASTER_PORT: \
             choose a port no other program uses"
                .into(),
        ));
    }
    let (rank, theirs) = (field(4), field(8));
    if theirs != world_size {
        return Err(Error::Invalid(format!(
            "rank {rank} expects a world of {theirs}, rank 0 one of {world_size}: give every \
             rank the same WORLD_SIZE (SLURM_NTASKS)"
        )));
    }
    if rank == 0 || rank >= world_size {
        return Err(Error::Invalid(format!(
            "a peer says it is rank {rank}: ranks 1 to {} connect to rank 0",
            world_size - 1
        )));
    }
    Ok(rank)
}

/// Every other rank's side: connects to rank 0 at `root` (`host:port`), retrying until it
/// listens or `timeout` has passed, says who it is and reads the id.
pub fn fetch_id(
    root: &str,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<[u8; ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    let failed = |why: String| {
        Error::Invalid(format!(
            "rank {rank}: no communicator id from rank 0 at {root} within {timeout:?} ({why}): \
             check that rank 0 runs and that MASTER_ADDR/MASTER_PORT name its host and a port \
             it can open"
        ))
    };
    let mut stream = connect(root, deadline).map_err(failed)?;
    let mut hello = HELLO_TAG.to_vec();
    hello.extend((rank as u32).to_le_bytes());
    hello.extend((world_size as u32).to_le_bytes());
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut id = [0u8; ID_BYTES];
    stream
        .set_read_timeout(Some(remaining.max(Duration::from_millis(1))))
        .and_then(|()| stream.write_all(&hello))
        .and_then(|()| stream.read_exact(&mut id))
        .map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => {
                failed("rank 0 closed the connection: see its error".into())
            }
            _ => failed(e.to_string()),
        })?;
    Ok(id)
}

/// The first connection to `root` that succeeds before `deadline`; the last failure if none.
fn connect(root: &str, deadline: Instant) -> std::result::Result<TcpStream, String> {
    loop {
        let attempt = root
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve it: {e}"))
            .and_then(|addrs| {
                let mut last = "it resolves to no address".to_string();
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(stream) => return Ok(stream),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(last)
            });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(why) if Instant::now() >= deadline => return Err(why),
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<Option<World>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_env(&|name| vars.get(name).cloned())
    }

    fn expect(vars: &[(&str, &str)], rank: usize, size: usize, local: usize, root: (&str, u16)) {
        let w = world(vars).unwrap().unwrap();
        assert_eq!(
            (
                w.rank,
                w.world_size,
                w.local_rank,
                w.root_host.as_str(),
                w.root_port
            ),
            (rank, size, local, root.0, root.1),
            "{vars:?}"
        );
    }

    fn refused(vars: &[(&str, &str)], names: &[&str]) {
        let e = world(vars).unwrap_err().to_string();
        assert!(names.iter().all(|n| e.contains(n)), "{vars:?}: {e}");
    }

    const TORCHRUN: [(&str, &str); 5] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node7"),
        ("MASTER_PORT", "1234"),
    ];
    const SLURM: [(&str, &str); 4] = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[03-04,07],login1"),
    ];

    #[test]
    fn launcher_variables_give_the_rank_and_the_root() {
        assert_eq!(world(&[]).unwrap(), None);
        expect(&TORCHRUN, 3, 8, 1, ("node7", 1234));
        expect(&TORCHRUN[..4], 3, 8, 1, ("node7", DEFAULT_PORT));
        // torchrun's store on MASTER_PORT: zlora's rendezvous on the next port.
        let shared = [&TORCHRUN[..], &[("TORCHELASTIC_USE_AGENT_STORE", "True")]].concat();
        expect(&shared, 3, 8, 1, ("node7", 1235));
        let own = [&TORCHRUN[..], &[("TORCHELASTIC_USE_AGENT_STORE", "False")]].concat();
        expect(&own, 3, 8, 1, ("node7", 1234));
        expect(&SLURM, 5, 8, 1, ("gpu03", DEFAULT_PORT));
        // torchrun inside a Slurm job: torchrun's variables describe this process.
        let mixed = [&SLURM[..], &TORCHRUN[..]].concat();
        expect(&mixed, 3, 8, 1, ("node7", 1234));
        // MASTER_ADDR / MASTER_PORT override Slurm's root.
        let over = [
            &SLURM[..],
            &[("MASTER_ADDR", "10.0.0.2"), ("MASTER_PORT", "4000")],
        ]
        .concat();
        expect(&over, 5, 8, 1, ("10.0.0.2", 4000));
        expect(
            &[
                ("WORLD_SIZE", "1"),
                ("RANK", "0"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "h"),
            ],
            0,
            1,
            0,
            ("h", DEFAULT_PORT),
        );
    }

    #[test]
    fn missing_or_bad_variables_are_named_with_the_fix() {
        refused(&TORCHRUN[1..], &["RANK is not set", "torchrun sets it"]);
        refused(
            &[&TORCHRUN[..2], &TORCHRUN[3..]].concat(),
            &["LOCAL_RANK is not set"],
        );
        refused(&TORCHRUN[..3], &["MASTER_ADDR is not set"]);
        refused(&SLURM[1..], &["SLURM_PROCID is not set", "srun"]);
        refused(
            &SLURM[..3],
            &["SLURM_JOB_NODELIST is not set", "MASTER_ADDR"],
        );
        let with = |vars: &[(&'static str, &'static str)], k: &'static str, v: &'static str| {
            let mut vars = vars.to_vec();
            vars.retain(|(name, _)| *name != k);
            vars.push((k, v));
            vars
        };
        refused(
            &with(&TORCHRUN, "RANK", "two"),
            &["RANK=two", "whole number"],
        );
        refused(&with(&TORCHRUN, "WORLD_SIZE", "-4"), &["WORLD_SIZE=-4"]);
        refused(
            &with(&TORCHRUN, "MASTER_PORT", "70000"),
            &["MASTER_PORT=70000", "1-65535"],
        );
        refused(&with(&TORCHRUN, "MASTER_PORT", "0"), &["MASTER_PORT=0"]);
        refused(&with(&TORCHRUN, "RANK", "8"), &["rank 8 of a world of 8"]);
        refused(&with(&TORCHRUN, "WORLD_SIZE", "0"), &["world of 0"]);
        refused(&with(&SLURM, "SLURM_NTASKS", "x"), &["SLURM_NTASKS=x"]);
        refused(
            &with(&SLURM, "SLURM_JOB_NODELIST", "gpu[a-b]"),
            &["SLURM_JOB_NODELIST=gpu[a-b]", "MASTER_ADDR"],
        );
    }

    #[test]
    fn a_rank_takes_its_local_gpu_unless_it_sees_only_one() {
        let w = world(&SLURM).unwrap().unwrap();
        assert_eq!(w.gpu(None), 1);
        assert_eq!(w.gpu(Some("0,1,2,3")), 1);
        assert_eq!(w.gpu(Some("5")), 0);
        assert_eq!(w.gpu(Some("GPU-8f2c")), 0);
    }

    #[test]
    fn the_first_host_of_a_slurm_host_list() {
        for (list, host) in [
            ("gpu[01-04,07],login1", "gpu01"),
            ("node12", "node12"),
            ("a1,b2", "a1"),
            ("gpu[7,1-3]", "gpu7"),
            ("rack[1-2]-n[003-005]", "rack1-n003"),
            (" gpu-[10-11].cluster ", "gpu-10.cluster"),
        ] {
            assert_eq!(first_host(list).unwrap(), host, "{list}");
        }
        for bad in ["", "gpu[]", "gpu[x]", "gpu]1", ",gpu1"] {
            assert!(first_host(bad).is_err(), "{bad}");
        }
    }

    /// A port that was free a moment ago.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn at(rank: usize, world_size: usize, port: u16) -> World {
        World {
            rank,
            world_size,
            local_rank: rank,
            root_host: "127.0.0.1".into(),
            root_port: port,
        }
    }

    #[test]
    fn four_ranks_receive_rank_0s_id() {
        let port = free_port();
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let ranks: Vec<_> = (0..4)
            .map(|rank| {
                std::thread::spawn(move || {
                    at(rank, 4, port).share_id(|| Ok(id), Duration::from_secs(20))
                })
            })
            .collect();
        for handle in ranks {
            assert_eq!(handle.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_rank_that_never_comes_ends_the_rendezvous_with_an_error() {
        let port = free_port();
        let started = Instant::now();
        let peer = std::thread::spawn(move || {
            at(1, 3, port).share_id(|| unreachable!(), Duration::from_secs(5))
        });
        let e = at(0, 3, port)
            .share_id(|| Ok([1; ID_BYTES]), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ranks 2 that never connected") && e.contains(&port.to_string()),
            "{e}"
        );
        // Rank 1 learns that rank 0 gave up instead of waiting for an id that never comes.
        let e = peer.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 0 closed the connection"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn a_root_that_never_listens_is_a_timeout_naming_the_address() {
        let port = free_port();
        let started = Instant::now();
        let e = at(2, 4, port)
            .share_id(|| unreachable!(), Duration::from_millis(600))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}"))
                && e.contains("within 600ms")
                && e.contains("MASTER_ADDR"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_rank_outside_the_world_is_refused() {
        let port = free_port();
        let peer = std::thread::spawn(move || {
            at(5, 3, port).share_id(|| unreachable!(), Duration::from_secs(10))
        });
        let e = at(0, 3, port)
            .share_id(|| Ok([0; ID_BYTES]), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("says it is rank 5") && e.contains("ranks 1 to 2"),
            "{e}"
        );
        assert!(peer.join().unwrap().is_err());
    }

    #[test]
    fn a_duplicate_rank_is_refused() {
        let port = free_port();
        let peers: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    at(1, 3, port).share_id(|| unreachable!(), Duration::from_secs(10))
                })
            })
            .collect();
        let e = at(0, 3, port)
            .share_id(|| Ok([0; ID_BYTES]), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 connected twice"), "{e}");
        for peer in peers {
            assert!(peer.join().unwrap().is_err());
        }
    }
}
