//! The CPU collectives: a star over TCP. Rank 0 listens at MASTER_ADDR:MASTER_PORT, every other
//! rank connects to it; a reduction is "each rank sends its buffer to rank 0, rank 0 adds them
//! in rank order and sends the sum back", so every rank holds the same bits whatever the timing.
//! Used for CPU runs and tests, and as the control channel beside NCCL (which carries the big
//! buffers on GPUs). Bandwidth is rank 0's link: fine for CPU training, not for GPUs.
//!
//! Frames: `[tag u8][len u64 LE][payload]`. Every read and write has the collective timeout; a
//! rank that fails (its connection closes or times out) makes rank 0 send an abort frame naming
//! it to every other rank, so all of them stop with the same message.

use super::{Collective, World};
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const HELLO: u8 = 1;
const DATA: u8 = 2;
const ABORT: u8 = 3;
/// Identifies the protocol in the hello frame (a stray client on the port is refused).
const MAGIC: &[u8; 8] = b"UDIdist1";
/// The longest the ranks wait for each other at start-up (torchrun's default is 900 s).
pub const RENDEZVOUS: Duration = Duration::from_secs(900);

/// One rank's end of the star.
pub struct TcpGroup {
    world: World,
    /// Rank 0: the connection of rank r at index r − 1. Other ranks: the one to rank 0.
    peers: Vec<TcpStream>,
    timeout: Duration,
    failed: Option<String>,
    seconds: f64,
}

impl TcpGroup {
    /// Rendezvous: rank 0 waits for the others to connect (each says its rank and the world
    /// size), the others retry connecting, for up to [`RENDEZVOUS`] or `timeout` if longer
    /// (ranks of a cluster job start minutes apart); then `timeout` bounds every collective.
    pub fn connect(world: &World, timeout: Duration) -> Result<Self> {
        let (addr, port) = world.master.clone().with_context(|| {
            format!(
                "world size {} needs MASTER_ADDR and MASTER_PORT (or SLURM's node list)",
                world.size
            )
        })?;
        let wait = timeout.max(RENDEZVOUS);
        let meet = Meet {
            world,
            addr: &addr,
            port,
            timeout,
            wait,
            deadline: Instant::now() + wait,
        };
        let peers = if world.rank == 0 {
            accept_all(&meet)?
        } else {
            vec![connect_hub(&meet)?]
        };
        Ok(Self {
            world: world.clone(),
            peers,
            timeout,
            failed: None,
            seconds: 0.0,
        })
    }

    fn fail(&mut self, msg: String) -> anyhow::Error {
        if self.world.rank == 0 {
            for p in &mut self.peers {
                let _ = write_frame(p, ABORT, msg.as_bytes());
            }
        }
        self.failed = Some(msg.clone());
        anyhow::anyhow!(msg)
    }

    /// Reads a DATA frame of exactly `len` bytes from `peer` (rank `from`).
    fn read_data(&mut self, i: usize, from: u32, len: usize, what: &str) -> Result<Vec<u8>> {
        let p = self.read_any(i, from, what)?;
        if p.len() != len {
            return Err(self.fail(format!(
                "rank {from} sent {} bytes to {what}, expected {len}: the ranks run different configs or steps",
                p.len()
            )));
        }
        Ok(p)
    }

    /// Reads a DATA frame from `peer` (rank `from`); an abort frame ends the job here too.
    fn read_any(&mut self, i: usize, from: u32, what: &str) -> Result<Vec<u8>> {
        let t = self.timeout;
        match read_frame(&mut self.peers[i]) {
            Ok((DATA, p)) => Ok(p),
            Ok((ABORT, p)) => {
                let m = String::from_utf8_lossy(&p).into_owned();
                if self.world.rank == 0 {
                    // Pass a rank's abort on to every other rank.
                    return Err(self.fail(m));
                }
                self.failed = Some(m.clone());
                bail!("{m}")
            }
            Ok((tag, _)) => Err(self.fail(format!("rank {from} sent frame {tag} during {what}"))),
            Err(e) => Err(self.fail(lost(from, what, t, &e))),
        }
    }

    /// An error if an earlier collective failed (the group is unusable then).
    fn ready(&self) -> Result<()> {
        match &self.failed {
            Some(f) => bail!("{f}"),
            None => Ok(()),
        }
    }

    /// Sends a DATA frame to `peer` (rank `to`).
    fn send(&mut self, i: usize, to: u32, what: &str, bytes: &[u8]) -> Result<()> {
        match write_frame(&mut self.peers[i], DATA, bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                let t = self.timeout;
                Err(self.fail(lost(to, what, t, &e)))
            }
        }
    }

    /// Rank 0: sends `bytes` to every other rank.
    fn send_all(&mut self, what: &str, bytes: &[u8]) -> Result<()> {
        for r in 1..self.world.size {
            self.send(r as usize - 1, r, what, bytes)?;
        }
        Ok(())
    }
}

/// The message for a rank whose connection failed during `what`.
fn lost(rank: u32, what: &str, timeout: Duration, e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "rank {rank} did not reach {what} within the collective timeout ({:.0} s): it hangs or is far behind; stopping every rank",
            timeout.as_secs_f64()
        ),
        _ => format!(
            "rank {rank} left the job during {what} ({e}): it exited or was killed; stopping every rank"
        ),
    }
}

impl Collective for TcpGroup {
    fn world(&self) -> &World {
        &self.world
    }

    fn all_reduce_sum_bytes(
        &mut self,
        buf: &mut [u8],
        add: &dyn Fn(&mut [u8], &[u8]),
    ) -> Result<()> {
        self.ready()?;
        let what = "an all-reduce";
        let start = Instant::now();
        if self.world.rank == 0 {
            for r in 1..self.world.size {
                let p = self.read_data(r as usize - 1, r, buf.len(), what)?;
                add(buf, &p);
            }
            self.send_all(what, buf)?;
        } else {
            self.send(0, 0, what, buf)?;
            let p = self.read_data(0, 0, buf.len(), what)?;
            buf.copy_from_slice(&p);
        }
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    fn reduce_seconds(&self) -> f64 {
        self.seconds
    }

    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        self.ready()?;
        let what = "a broadcast";
        if self.world.rank == 0 {
            self.send_all(what, bytes)
        } else {
            *bytes = self.read_any(0, 0, what)?;
            Ok(())
        }
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.ready()?;
        let what = "an all-gather";
        if self.world.rank == 0 {
            let mut parts = vec![mine.to_vec()];
            for r in 1..self.world.size {
                parts.push(self.read_any(r as usize - 1, r, what)?);
            }
            let blob: Vec<u8> = parts
                .iter()
                .flat_map(|p| {
                    (p.len() as u64)
                        .to_le_bytes()
                        .into_iter()
                        .chain(p.iter().copied())
                })
                .collect();
            self.send_all(what, &blob)?;
            Ok(parts)
        } else {
            self.send(0, 0, what, mine)?;
            let blob = self.read_any(0, 0, what)?;
            let mut parts = Vec::new();
            let mut rest = &blob[..];
            while rest.len() >= 8 {
                let n = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
                if rest.len() < 8 + n {
                    bail!("rank 0 sent a damaged all-gather");
                }
                parts.push(rest[8..8 + n].to_vec());
                rest = &rest[8 + n..];
            }
            Ok(parts)
        }
    }

    fn abort(&mut self, why: &str) {
        let msg = format!("rank {} stopped the job: {why}", self.world.rank);
        for p in &mut self.peers {
            let _ = write_frame(p, ABORT, msg.as_bytes());
        }
        self.failed = Some(msg);
    }
}

/// Where and how long the ranks meet at start-up.
struct Meet<'a> {
    world: &'a World,
    addr: &'a str,
    port: u16,
    /// Every read and write once connected.
    timeout: Duration,
    /// The rendezvous, ending at `deadline`.
    wait: Duration,
    deadline: Instant,
}

fn accept_all(m: &Meet) -> Result<Vec<TcpStream>> {
    let Meet {
        world,
        addr,
        port,
        timeout,
        wait,
        deadline,
    } = *m;
    let listener = TcpListener::bind(("0.0.0.0", port))
        .or_else(|_| TcpListener::bind((addr, port)))
        .with_context(|| format!("rank 0: listening on port {port} (MASTER_PORT)"))?;
    listener.set_nonblocking(true)?;
    let mut slots: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)?;
                setup(&s, timeout)?;
                // A stray connection (a port scanner, a rank of another job) is dropped.
                let Ok((HELLO, p)) = read_frame(&mut s) else {
                    continue;
                };
                let Some((rank, size)) = parse_hello(&p) else {
                    continue;
                };
                if size != world.size {
                    bail!("rank {rank} (from {from}) says world size {size}, rank 0 has {}: the ranks were started differently", world.size);
                }
                if rank == 0 || rank >= world.size || slots[rank as usize - 1].is_some() {
                    bail!("rank 0: a second rank {rank} connected from {from}: two jobs on one MASTER_PORT?");
                }
                write_frame(&mut s, HELLO, &hello(0, world.size))?;
                slots[rank as usize - 1] = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rank 0: rank(s) {} did not connect to port {port} within {:.0} s",
                        missing.join(", "),
                        wait.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("rank 0: accepting ranks"),
        }
    }
    Ok(slots.into_iter().map(Option::unwrap).collect())
}

fn connect_hub(m: &Meet) -> Result<TcpStream> {
    let Meet {
        world,
        addr,
        port,
        timeout,
        wait,
        deadline,
    } = *m;
    let target = (addr, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving MASTER_ADDR {addr}"))?
        .next()
        .with_context(|| format!("MASTER_ADDR {addr} resolves to nothing"))?;
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(mut s) => {
                setup(&s, timeout)?;
                write_frame(&mut s, HELLO, &hello(world.rank, world.size))?;
                match read_frame(&mut s) {
                    Ok((HELLO, _)) => return Ok(s),
                    Ok((ABORT, p)) => bail!("{}", String::from_utf8_lossy(&p)),
                    _ => bail!(
                        "rank {}: rank 0 at {addr}:{port} refused the connection (another world size?)",
                        world.rank
                    ),
                }
            }
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "rank {}: could not reach rank 0 at {addr}:{port} within {:.0} s",
                        world.rank,
                        wait.as_secs_f64()
                    )
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn setup(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(())
}

fn hello(rank: u32, size: u32) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&rank.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v
}

fn parse_hello(p: &[u8]) -> Option<(u32, u32)> {
    if p.len() != 16 || &p[..8] != MAGIC {
        return None;
    }
    Some((
        u32::from_le_bytes(p[8..12].try_into().ok()?),
        u32::from_le_bytes(p[12..16].try_into().ok()?),
    ))
}

fn write_frame(s: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

/// Frames above this are refused (the largest buffer we reduce is the gradient, < 4 GiB).
const MAX_FRAME: u64 = 1 << 34;

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap());
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p)?;
    Ok((head[0], p))
}
