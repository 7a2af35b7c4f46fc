//! The GPU collectives: NCCL through cudarc (libnccl.so.2 is opened at run time, like the other
//! CUDA libraries, so the binary still starts without it). The TCP star ([`TcpGroup`]) stays
//! the control channel: it hands out NCCL's unique id at start-up and carries the small host
//! reductions (losses, monitors, the stop decision), which also notices a dead rank at once.
//! The large device buffers (the flat gradient with the batch centres) go through
//! `ncclAllReduce` in place, on candle's stream.
//!
//! NCCL calls do not time out by themselves: after each one the host polls its completion
//! event and gives up when the collective timeout passes (the communicator is aborted when the
//! group is dropped), so a hung rank ends the job with an error instead of a hang. A dead rank
//! is usually noticed first by the control channel, which the step uses before NCCL.

use super::tcp::TcpGroup;
use super::{Collective, World};
use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc;
use candle_core::{CpuStorage, CudaStorage, Device, Layout, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::time::{Duration, Instant};

/// A communicator used by one thread at a time (the training loop's).
struct OwnedComm(Comm);
// SAFETY: NCCL communicators may be used from any thread as long as calls are not concurrent;
// the trainer makes every call from its main thread.
unsafe impl Send for OwnedComm {}
unsafe impl Sync for OwnedComm {}

pub struct NcclGroup {
    tcp: TcpGroup,
    comm: OwnedComm,
    timeout: Duration,
    /// Seconds spent in NCCL all-reduces.
    spent: f64,
}

/// Whether libnccl can be opened (checked before choosing this backend).
pub fn available() -> bool {
    // SAFETY: only tries dlopen on the candidate names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

impl NcclGroup {
    /// Rendezvous over TCP, then rank 0's NCCL unique id to every rank, then the communicator
    /// on `device`'s stream.
    pub fn connect(world: &World, timeout: Duration, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("NCCL needs a CUDA device");
        };
        let mut tcp = TcpGroup::connect(world, timeout)?;
        let mut id_bytes = if world.rank == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        tcp.broadcast(&mut id_bytes)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            bail!("rank 0 sent an NCCL id of {} bytes", id_bytes.len());
        }
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            dev.cuda_stream(),
            world.rank as usize,
            world.size as usize,
            Id::uninit(internal),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "ncclCommInitRank (rank {} of {}): {e:?}",
                world.rank,
                world.size
            )
        })?;
        Ok(Self {
            tcp,
            comm: OwnedComm(comm),
            timeout,
            spent: 0.0,
        })
    }

    /// Waits for the work queued on the communicator's stream, up to the timeout.
    fn wait(&mut self, what: &str) -> Result<()> {
        let stream = self.comm.0.stream();
        let done = stream
            .record_event(None)
            .context("recording the all-reduce's completion")?;
        let start = Instant::now();
        loop {
            if done.try_is_complete().context("querying the all-reduce")? {
                return Ok(());
            }
            if start.elapsed() > self.timeout {
                let msg = format!(
                    "NCCL {what} did not complete within the collective timeout ({:.0} s): a rank hangs; stopping every rank",
                    self.timeout.as_secs_f64()
                );
                self.tcp.abort(&msg);
                bail!("{msg}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Sum over ranks in place (candle's in-place op hands us the device buffer).
struct AllReduceSum<'a>(&'a Comm);

impl candle_core::InplaceOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL reduces CUDA tensors only")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce of a non-contiguous tensor")
        };
        let e = |e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}"));
        match s.dtype() {
            candle_core::DType::F32 => {
                let mut v = s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
                self.0
                    .all_reduce_in_place(&mut v, &ReduceOp::Sum)
                    .map_err(e)?;
            }
            candle_core::DType::F64 => {
                let mut v = s.as_cuda_slice_mut::<f64>()?.slice_mut(a..b);
                self.0
                    .all_reduce_in_place(&mut v, &ReduceOp::Sum)
                    .map_err(e)?;
            }
            d => candle_core::bail!("NCCL all-reduce of {d:?}"),
        }
        Ok(())
    }
}

impl Collective for NcclGroup {
    fn world(&self) -> &World {
        self.tcp.world()
    }
    fn all_reduce_sum_bytes(
        &mut self,
        buf: &mut [u8],
        add: &dyn Fn(&mut [u8], &[u8]),
    ) -> Result<()> {
        self.tcp.all_reduce_sum_bytes(buf, add)
    }
    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        self.tcp.broadcast(bytes)
    }
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.tcp.all_gather_bytes(mine)
    }
    fn abort(&mut self, why: &str) {
        self.tcp.abort(why)
    }
    fn reduce_seconds(&self) -> f64 {
        self.spent + self.tcp.reduce_seconds()
    }
    fn all_reduce_tensor(&mut self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            // Host tensors go over the control channel.
            return self.tcp.all_reduce_tensor(t);
        }
        let start = Instant::now();
        // A buffer of its own: the caller's tensor may be a view shared with other tensors.
        let out = t.flatten_all()?.copy()?;
        out.inplace_op1(&AllReduceSum(&self.comm.0))?;
        self.wait("all-reduce")?;
        self.spent += start.elapsed().as_secs_f64();
        Ok(out.reshape(t.shape())?)
    }
}
