//! Data-parallel training: which rank this process is ([`World`], from the variables `torchrun`
//! or SLURM set), the collectives the step needs ([`Collective`]: a sum over ranks, a broadcast
//! from rank 0), and `trainer launch` ([`launch`]).
//!
//! A step of world size W with `accumulate` K is W·K groups ("GPUs" in the official code) of
//! the per-rank batch: each group's loss is computed as one GPU's, the gradients and the
//! teacher's batch centres are averaged over the W·K groups (udi-spec §3.4: the mean of
//! per-GPU means), and every rank applies the same update. The split of the global batch is
//! [`shared::rng::Slice`].

pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use crate::run_dir::RunDir;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use std::time::Duration;

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub size: u32,
    pub rank: u32,
    /// The rank on this host (selects the GPU).
    pub local_rank: u32,
    /// Where rank 0 listens (MASTER_ADDR, MASTER_PORT); `None` for one process.
    pub master: Option<(String, u16)>,
}

/// SLURM's default rendezvous port when MASTER_PORT is unset (any fixed port works; all ranks
/// derive the same one).
const SLURM_DEFAULT_PORT: u16 = 29500;

impl World {
    pub const SINGLE: World = World {
        size: 1,
        rank: 0,
        local_rank: 0,
        master: None,
    };

    /// From the environment: `torchrun`'s WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    /// first, then SLURM's SLURM_NTASKS/SLURM_PROCID/SLURM_LOCALID and the first host of
    /// SLURM_JOB_NODELIST (MASTER_ADDR/MASTER_PORT still win when set); else one process.
    pub fn from_env() -> Result<World> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<World> {
        let num = |k: &str| -> Result<Option<u32>> {
            var(k)
                .map(|v| {
                    v.trim()
                        .parse::<u32>()
                        .with_context(|| format!("{k}={v} is not a number"))
                })
                .transpose()
        };
        let port = || -> Result<Option<u16>> {
            var("MASTER_PORT")
                .map(|v| {
                    v.trim()
                        .parse::<u16>()
                        .with_context(|| format!("MASTER_PORT={v} is not a port"))
                })
                .transpose()
        };
        let (size, rank, local, host) = if let Some(size) = num("WORLD_SIZE")? {
            let rank = num("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            (size, rank, num("LOCAL_RANK")?.unwrap_or(rank), None)
        } else if let Some(size) = num("SLURM_NTASKS")? {
            let rank =
                num("SLURM_PROCID")?.context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
            let nodes = var("SLURM_JOB_NODELIST").or_else(|| var("SLURM_NODELIST"));
            let host = nodes.map(|n| first_host(&n)).transpose()?;
            (size, rank, num("SLURM_LOCALID")?.unwrap_or(0), host)
        } else {
            return Ok(World::SINGLE);
        };
        ensure!(size >= 1, "world size 0");
        ensure!(
            rank < size,
            "rank {rank} is not below the world size {size}"
        );
        // One rank needs no rendezvous unless one is given (`trainer launch --gpus 1` measures the
        // collectives' cost at world size 1).
        let given = var("MASTER_ADDR").is_some() && var("MASTER_PORT").is_some();
        let master = if size == 1 && !given {
            None
        } else {
            let addr = var("MASTER_ADDR").or(host).context(
                "a job of several ranks needs MASTER_ADDR (torchrun sets it; under SLURM it is the first host of the node list)",
            )?;
            let port = match port()? {
                Some(p) => p,
                None if var("SLURM_NTASKS").is_some() => SLURM_DEFAULT_PORT,
                None => bail!("a job of several ranks needs MASTER_PORT"),
            };
            Some((addr, port))
        };
        Ok(World {
            size,
            rank,
            local_rank: local,
            master,
        })
    }
}

/// The first host of a SLURM node list: `node[01-04,07],gpu3` → `node01`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let first = match (list.find('['), list.find(',')) {
        (Some(b), c) if c.is_none_or(|c| b < c) => {
            let end = list[b..]
                .find(']')
                .with_context(|| format!("node list {list}: unclosed ["))?;
            let inner = &list[b + 1..b + end];
            let first = inner.split(',').next().unwrap_or("");
            let first = first.split('-').next().unwrap_or("");
            format!("{}{}", &list[..b], first)
        }
        (_, Some(c)) => list[..c].to_string(),
        _ => list.to_string(),
    };
    ensure!(!first.is_empty(), "node list '{list}' names no host");
    Ok(first)
}

/// What the step needs of a group of ranks. Every call must be made by every rank, in the same
/// order; a rank that fails or stops answering within the timeout ends the call with an error
/// naming it on every rank.
pub trait Collective: Send {
    fn world(&self) -> &World;

    /// Sums `buf` over ranks element-wise with `add`, in rank order (every rank receives the
    /// same bits).
    fn all_reduce_sum_bytes(
        &mut self,
        buf: &mut [u8],
        add: &dyn Fn(&mut [u8], &[u8]),
    ) -> Result<()>;

    /// Replaces `bytes` on every rank by rank 0's.
    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()>;

    /// Every rank's `mine`, in rank order, on every rank.
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Every rank's list of u64, in rank order, on every rank.
    fn all_gather_u64(&mut self, mine: &[u64]) -> Result<Vec<Vec<u64>>> {
        let b: Vec<u8> = mine.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(self
            .all_gather_bytes(&b)?
            .into_iter()
            .map(|p| {
                p.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            })
            .collect())
    }

    /// Tells the other ranks this one is stopping (best effort) with the reason.
    fn abort(&mut self, why: &str);

    /// Seconds spent in all-reduces so far.
    fn reduce_seconds(&self) -> f64 {
        0.0
    }

    /// Σ over ranks of an f64 vector (losses, monitors, counters).
    fn all_reduce_f64(&mut self, v: &mut [f64]) -> Result<()> {
        if self.world().size == 1 {
            return Ok(());
        }
        let mut b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.all_reduce_sum_bytes(&mut b, &|acc, x| {
            add_le(acc, x, f64::from_le_bytes, f64::to_le_bytes)
        })?;
        for (x, c) in v.iter_mut().zip(b.chunks_exact(8)) {
            *x = f64::from_le_bytes(c.try_into().unwrap());
        }
        Ok(())
    }

    /// Σ over ranks of a flat tensor (the gradient buffer and the batch centres), in its dtype.
    /// The CPU backend goes through host memory; NCCL reduces in place on the GPU.
    fn all_reduce_tensor(&mut self, t: &Tensor) -> Result<Tensor> {
        if self.world().size == 1 {
            return Ok(t.clone());
        }
        let (dev, shape) = (t.device().clone(), t.shape().clone());
        match t.dtype() {
            DType::F64 => {
                let mut v = t.flatten_all()?.to_vec1::<f64>()?;
                self.all_reduce_f64(&mut v)?;
                Ok(Tensor::from_vec(v, shape, &dev)?)
            }
            DType::F32 => {
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                let mut b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                self.all_reduce_sum_bytes(&mut b, &|acc, x| {
                    add_le(acc, x, f32::from_le_bytes, f32::to_le_bytes)
                })?;
                let v: Vec<f32> = b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                Ok(Tensor::from_vec(v, shape, &dev)?)
            }
            d => bail!("all-reduce of {d:?} tensors is not supported"),
        }
    }
}

/// `acc += x` element-wise over little-endian values of `N` bytes.
fn add_le<T: std::ops::Add<Output = T>, const N: usize>(
    acc: &mut [u8],
    x: &[u8],
    from: fn([u8; N]) -> T,
    to: fn(T) -> [u8; N],
) {
    for (a, x) in acc.chunks_exact_mut(N).zip(x.chunks_exact(N)) {
        let s = from(a.try_into().unwrap()) + from(x.try_into().unwrap());
        a.copy_from_slice(&to(s));
    }
}

/// The group of one process: every collective is the identity.
pub struct Single(World);

impl Single {
    pub fn new() -> Self {
        Self(World::SINGLE)
    }
}

impl Default for Single {
    fn default() -> Self {
        Self::new()
    }
}

impl Collective for Single {
    fn world(&self) -> &World {
        &self.0
    }
    fn all_reduce_sum_bytes(&mut self, _: &mut [u8], _: &dyn Fn(&mut [u8], &[u8])) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn abort(&mut self, _: &str) {}
}

/// How long the ranks of an evaluation (`knn`, `features`) wait for each other: a rank may
/// extract its share of a large set while another finishes a slower one.
pub const EVAL_TIMEOUT: Duration = Duration::from_secs(3600);

/// This process's group: [`World::from_env`], then [`connect`].
pub fn join(timeout: Duration, device: &candle_core::Device) -> Result<Box<dyn Collective>> {
    connect(&World::from_env()?, timeout, device)
}

/// The collectives of `world` for tensors on `device`: none for one process, NCCL for CUDA
/// tensors (when the binary has CUDA support and libnccl loads), else the TCP star.
pub fn connect(
    world: &World,
    timeout: Duration,
    device: &candle_core::Device,
) -> Result<Box<dyn Collective>> {
    if world.master.is_none() {
        return Ok(Box::new(Single(world.clone())));
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        if !nccl::available() {
            bail!("rank {}: training on several GPUs needs libnccl.so.2 (NCCL 2.x) on the library path", world.rank);
        }
        return Ok(Box::new(nccl::NcclGroup::connect(world, timeout, device)?));
    }
    let _ = device;
    Ok(Box::new(tcp::TcpGroup::connect(world, timeout)?))
}

/// Opens the run directory as this rank: rank 0 locks and prepares it ([`RunDir::open`]) and
/// sends the others its config and the checkpoint it resumes from; they check the config is
/// theirs and follow ([`RunDir::follow`]). A failure on rank 0 stops every rank.
pub fn open_run(
    comm: &mut dyn Collective,
    dir: &std::path::Path,
    config_toml: &str,
    resume: bool,
) -> Result<RunDir> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Plan {
        config_toml: String,
        resume_from: Option<std::path::PathBuf>,
    }
    if comm.world().size == 1 {
        return RunDir::open(dir, config_toml, resume);
    }
    if comm.world().rank == 0 {
        let run = match RunDir::open(dir, config_toml, resume) {
            Ok(r) => r,
            Err(e) => {
                comm.abort(&format!("{e:#}"));
                return Err(e);
            }
        };
        let plan = Plan {
            config_toml: config_toml.to_string(),
            resume_from: run.resume_from.as_ref().map(|(c, _)| c.dir.clone()),
        };
        comm.broadcast(&mut serde_json::to_vec(&plan)?)?;
        Ok(run)
    } else {
        let mut b = Vec::new();
        comm.broadcast(&mut b)?;
        let plan: Plan = serde_json::from_slice(&b).context("rank 0's run plan")?;
        let rank = comm.world().rank;
        if plan.config_toml != config_toml {
            let msg = format!(
                "rank {rank} was started with another config than rank 0 (config file or --set overrides differ)"
            );
            comm.abort(&msg);
            bail!("{msg}");
        }
        RunDir::follow(dir, plan.resume_from.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world_of(vars: &[(&str, &str)]) -> Result<World> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        assert_eq!(world_of(&[]).unwrap(), World::SINGLE);
        let w = world_of(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            (w.size, w.rank, w.local_rank, w.master),
            (4, 3, 1, Some(("10.0.0.2".into(), 29400)))
        );
        let s = world_of(&[
            ("SLURM_NTASKS", "16"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,11],cpu1"),
        ])
        .unwrap();
        assert_eq!(
            (s.size, s.rank, s.local_rank, s.master),
            (16, 9, 1, Some(("gpu07".into(), SLURM_DEFAULT_PORT)))
        );
        // torchrun's variables win over SLURM's (torchrun inside an allocation).
        let t = world_of(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("WORLD_SIZE", "1"),
            ("RANK", "0"),
        ])
        .unwrap();
        assert_eq!(t, World::SINGLE);
        assert!(world_of(&[("WORLD_SIZE", "2"), ("RANK", "2")]).is_err());
        assert!(world_of(&[("WORLD_SIZE", "2"), ("RANK", "1")])
            .unwrap_err()
            .to_string()
            .contains("MASTER_ADDR"));
        assert!(world_of(&[("WORLD_SIZE", "x"), ("RANK", "0")]).is_err());
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("node1").unwrap(), "node1");
        assert_eq!(first_host("a,b").unwrap(), "a");
        assert_eq!(first_host("gpu[003-010]").unwrap(), "gpu003");
        assert_eq!(first_host("gpu[5,7-9],cpu[1-2]").unwrap(), "gpu5");
        assert_eq!(first_host("login,gpu[1-2]").unwrap(), "login");
        assert!(first_host("").is_err());
        assert!(first_host("gpu[1-2").is_err());
    }

    /// Ranks as threads on one host: sums arrive in rank order with identical bits everywhere;
    /// a rank that leaves makes every other rank fail with its number.
    #[test]
    fn tcp_all_reduce_and_failures() {
        let port = free_port();
        let run = |rank: u32| {
            std::thread::spawn(move || -> Result<(Vec<f64>, Vec<f32>, Vec<u8>)> {
                let w = World {
                    size: 3,
                    rank,
                    local_rank: rank,
                    master: Some(("127.0.0.1".into(), port)),
                };
                let mut g = connect(&w, Duration::from_secs(20), &candle_core::Device::Cpu)?;
                let mut v = vec![
                    rank as f64 + 0.5,
                    [1e16, 1.0, -1e16][rank as usize],
                    -(rank as f64),
                ];
                g.all_reduce_f64(&mut v)?;
                let t = Tensor::new(
                    &[0.1f32 * (rank + 1) as f32, 3.0],
                    &candle_core::Device::Cpu,
                )?;
                let s = g.all_reduce_tensor(&t)?.to_vec1::<f32>()?;
                let mut b = if rank == 0 { b"hello".to_vec() } else { vec![] };
                g.broadcast(&mut b)?;
                let all = g.all_gather_u64(&(0..rank as u64).collect::<Vec<_>>())?;
                assert_eq!(all, vec![vec![], vec![0], vec![0, 1]]);
                if rank == 2 {
                    return Ok((v, s, b)); // leaves: the next collective fails on the others
                }
                let mut x = vec![1.0];
                let e = g.all_reduce_f64(&mut x).unwrap_err().to_string();
                assert!(e.contains("rank 2"), "rank {rank}: {e}");
                Ok((v, s, b))
            })
        };
        let hs: Vec<_> = (0..3).map(run).collect();
        let out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        // (1e16 + 1) − 1e16 is 0 in rank order (1 otherwise): the order is fixed.
        let want_f64 = vec![4.5, 0.0, -3.0];
        let want_f32 = vec![(0.1f32 + 0.2) + 0.3f32, 9.0];
        for (v, s, b) in &out {
            assert_eq!(v, &want_f64);
            assert_eq!(s, &want_f32);
            assert_eq!(b, b"hello");
        }
    }

    pub(crate) fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
