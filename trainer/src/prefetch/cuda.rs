//! The CUDA side of the prefetch: page-locked staging, the copy on a stream of its own, candle's
//! stream waiting on the copy. cudarc's per-buffer event tracking is off (`crate::device`), so
//! every order between the two streams is explicit here:
//! - candle's stream reads a device slot only after the copy into it (`Pending::copied`);
//! - the copy stream writes a slot again only after candle's stream is done reading it (the
//!   `consumed` event that comes back with the slot);
//! - the page-locked buffers are refilled only after the copy out of them completed (the worker
//!   waits on `copied` before it stages the next batch).
//!
//! candle's tensors never own slot memory: the training thread copies each part out of the slot
//! on candle's stream (device to device, a few µs per MB), so tensors are freed in candle's
//! stream order as always.

use super::Ready;
use crate::staging::{HostStage, StageBuf, Staged, Upload};
use crate::train::FedBatch;
use crate::train_feed::BatchSource;
use anyhow::{anyhow, ensure, Result};
use candle_core::cuda::cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};
use shared::config::AugmentConfig;
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

/// Device slots: one being filled by the worker while the training thread reads the other.
const SLOTS: usize = 2;

/// Device memory one batch is copied into.
struct Slot {
    pixels: CudaSlice<u8>,
    rows: CudaSlice<f32>,
}

/// A slot on its way back to the worker, and the event after which candle's stream no longer
/// reads it (None: never read).
type Returned = (Option<Slot>, Option<CudaEvent>);

/// A batch whose copy to the device was issued.
pub(super) struct Pending {
    staged: Staged,
    slot: Slot,
    copied: CudaEvent,
}

/// Page-locked staging buffers, (re)allocated for the batch size at first use.
#[derive(Default)]
struct Pinned {
    ctx: Option<Arc<candle_core::cuda::cudarc::driver::CudaContext>>,
    pixels: Option<PinnedHostSlice<u8>>,
    rows: Option<PinnedHostSlice<f32>>,
    /// Where the batch went instead when page-locked memory could not be had, and why: the
    /// batch is already out of its source, so it must not be lost with the error.
    fallback: Option<(HostStage, anyhow::Error)>,
}

impl Pinned {
    /// Page-locked buffers of these sizes.
    fn ensure(&mut self, pixels: usize, rows: usize) -> Result<()> {
        let ctx = self.ctx.as_ref().expect("set by pair()");
        if self.pixels.as_ref().map(|p| p.len()) != Some(pixels) {
            self.pixels = None;
            // Write-combined: the host only writes it (memcpy), the GPU reads it.
            // SAFETY: the buffer is written in full before anything reads it (Staged::from_view).
            self.pixels = Some(unsafe { ctx.alloc_pinned::<u8>(pixels)? });
        }
        if self.rows.as_ref().map(|p| p.len()) != Some(rows) {
            self.rows = None;
            // Cached (no flags): dense_rows reads back what it accumulates.
            // SAFETY: dense_rows zeroes it before anything reads it.
            self.rows = Some(unsafe { ctx.alloc_pinned_with_flags::<f32>(rows, 0)? });
        }
        Ok(())
    }
}

impl StageBuf for Pinned {
    fn get(&mut self, pixels: usize, rows: usize) -> Result<(&mut [u8], &mut [f32])> {
        match self.ensure(pixels, rows) {
            Ok(()) => {
                let (p, r) = (self.pixels.as_mut().unwrap(), self.rows.as_mut().unwrap());
                Ok((p.as_mut_slice()?, r.as_mut_slice()?))
            }
            Err(e) => self
                .fallback
                .insert((HostStage::default(), e))
                .0
                .get(pixels, rows),
        }
    }
}

/// The worker's half.
pub(super) struct Stager {
    copy: Arc<CudaStream>,
    pinned: Pinned,
    free: Receiver<Returned>,
    failed: bool,
}

/// The training thread's half.
pub(super) struct Returns {
    dev: CudaDevice,
    back: Sender<Returned>,
}

/// A copy stream on candle's context, page-locked staging and [`SLOTS`] device slots.
pub(super) fn pair(dev: &CudaDevice) -> Result<(Stager, Returns)> {
    let ctx = dev.cuda_stream().context().clone();
    let copy = ctx.new_stream()?;
    let (back, free) = channel();
    for _ in 0..SLOTS {
        back.send((None, None))?;
    }
    let pinned = Pinned {
        ctx: Some(ctx),
        ..Default::default()
    };
    let stager = Stager {
        copy,
        pinned,
        free,
        failed: false,
    };
    Ok((
        stager,
        Returns {
            dev: dev.clone(),
            back,
        },
    ))
}

pub(super) fn warn_once(e: &anyhow::Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        eprintln!(
            "warning: batch prefetch to the GPU failed ({e:#}); batches are copied to the GPU \
             synchronously from now on"
        )
    });
}

impl Stager {
    /// After a CUDA error the worker stages in host memory instead.
    pub(super) fn failed(&self) -> bool {
        self.failed
    }

    /// Stages the next batch in page-locked memory (the source's slot is free again) and copies
    /// it to a device slot on the copy stream.
    pub(super) fn next(&mut self, src: &mut dyn BatchSource, aug: &AugmentConfig) -> Result<Ready> {
        let staged = src.next_staged(aug, &mut self.pinned)?;
        if let Some((host, e)) = self.pinned.fallback.take() {
            warn_once(&e);
            self.failed = true;
            return Ok(Ready::Host(staged, host));
        }
        match self.copy_out() {
            Ok((slot, copied)) => Ok(Ready::Device(Pending {
                staged,
                slot,
                copied,
            })),
            Err(e) => {
                warn_once(&e);
                self.failed = true;
                let (p, r) = (self.pinned.pixels.as_ref(), self.pinned.rows.as_ref());
                let host = HostStage {
                    pixels: p.unwrap().as_slice()?.to_vec(),
                    rows: r.unwrap().as_slice()?.to_vec(),
                };
                Ok(Ready::Host(staged, host))
            }
        }
    }

    fn copy_out(&mut self) -> Result<(Slot, CudaEvent)> {
        let (Some(px), Some(rows)) = (&self.pinned.pixels, &self.pinned.rows) else {
            return Err(anyhow!("nothing staged"));
        };
        let (slot, consumed) = self
            .free
            .recv()
            .map_err(|_| anyhow!("the training thread is gone"))?;
        if let Some(ev) = &consumed {
            self.copy.wait(ev)?;
        }
        let mut slot = match slot {
            Some(s) if s.pixels.len() == px.len() && s.rows.len() == rows.len() => s,
            _ => Slot {
                pixels: self.copy.alloc_zeros::<u8>(px.len())?,
                rows: self.copy.alloc_zeros::<f32>(rows.len())?,
            },
        };
        // From page-locked memory: DMA, asynchronous to the host and to candle's stream.
        self.copy.memcpy_htod(px.as_slice()?, &mut slot.pixels)?;
        self.copy.memcpy_htod(rows.as_slice()?, &mut slot.rows)?;
        let copied = self
            .copy
            .record_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?;
        // The page-locked buffers are refilled with the next batch only after this copy.
        copied.synchronize()?;
        Ok((slot, copied))
    }
}

impl Returns {
    /// The batch's tensors on candle's stream, once the copy into its slot completed; the slot
    /// goes back to the worker with the event after which candle's stream is done with it.
    pub(super) fn finish(&self, p: Pending, aug: &AugmentConfig) -> Result<FedBatch> {
        let stream = self.dev.cuda_stream();
        let up = SlotUpload {
            slot: &p.slot,
            dev: &self.dev,
            stream: &stream,
        };
        let fed = match stream.wait(&p.copied) {
            Ok(()) => FedBatch::upload(p.staged, &up, aug),
            Err(e) => Err(e.into()),
        };
        let kept = match stream.record_event(None) {
            Ok(consumed) => self
                .back
                .send((Some(p.slot), Some(consumed)))
                .err()
                .map(|e| e.0),
            Err(_) => Some((Some(p.slot), None)),
        };
        if let Some(slot) = kept {
            // The worker stopped, or CUDA failed: the slot is freed here, once candle's stream
            // is done with it.
            let synced = stream.synchronize();
            drop(slot);
            synced?;
        }
        fed
    }
}

/// Tensors copied out of a device slot on candle's stream.
struct SlotUpload<'a> {
    slot: &'a Slot,
    dev: &'a CudaDevice,
    stream: &'a Arc<CudaStream>,
}

impl SlotUpload<'_> {
    fn wrap<T: CudaDType>(&self, s: CudaSlice<T>, shape: &[usize]) -> Result<Tensor> {
        ensure!(
            s.len() == shape.iter().product::<usize>(),
            "slot part of {} values for {shape:?}",
            s.len()
        );
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, self.dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

impl Upload for SlotUpload<'_> {
    fn pixels(&self, range: Range<usize>, shape: &[usize]) -> Result<Tensor> {
        self.wrap(
            self.stream.clone_dtod(&self.slot.pixels.slice(range))?,
            shape,
        )
    }
    fn rows(&self, range: Range<usize>, shape: &[usize]) -> Result<Tensor> {
        self.wrap(self.stream.clone_dtod(&self.slot.rows.slice(range))?, shape)
    }
}
