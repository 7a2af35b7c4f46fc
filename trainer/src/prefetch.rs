//! `[run] prefetch`: batch s+1 is copied out of its source (a ring slot, which goes back to the
//! loaders at once) and sent on its way to the device while step s runs. A worker thread owns
//! the [`BatchSource`] and stays one batch ahead; the training thread takes the batches in the
//! order the worker staged them, so they are the plain feed's batches, bit for bit, in its order.
//!
//! On the CPU the worker makes the whole batch (plain memory). On CUDA it stages into page-locked
//! memory and copies to the device on a stream of its own (`cuda`); the training thread makes
//! candle's stream wait for that copy and normalises there. If CUDA fails on the worker side,
//! batches are staged in host memory and uploaded on the training thread from then on.

#[cfg(feature = "cuda")]
mod cuda;

use crate::bad_records::RecordNames;
use crate::staging::{HostStage, Staged};
use crate::train::{BatchFeed, FedBatch};
use crate::train_feed::{record_name, BatchSource};
use anyhow::{anyhow, bail, Result};
use candle_core::Device;
use shared::config::AugmentConfig;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

/// A [`BatchFeed`] that stages the next batch of its source on a thread of its own.
pub struct Prefetch {
    n_samples: u64,
    dataset_id: u64,
    names: Option<RecordNames>,
    device: Device,
    state: State,
}

enum State {
    /// Not started, or stopped (by a seek, or after the source failed): the source is here.
    Idle(Box<dyn BatchSource>),
    Running(Worker),
    /// The worker thread panicked with the source (or it is being moved between states).
    Lost,
}

struct Worker {
    ready: Receiver<Result<Ready>>,
    handle: JoinHandle<Box<dyn BatchSource>>,
    #[cfg(feature = "cuda")]
    returns: Option<cuda::Returns>,
}

/// A batch the worker made ready.
enum Ready {
    /// The whole batch (CPU).
    Done(FedBatch),
    /// Staged in host memory: uploaded by the training thread.
    Host(Staged, HostStage),
    /// On its way to the device.
    #[cfg(feature = "cuda")]
    Device(cuda::Pending),
}

/// How the worker stages.
enum Stager {
    Host(HostStage),
    #[cfg(feature = "cuda")]
    Cuda(cuda::Stager),
}

impl Stager {
    fn next(
        &mut self,
        src: &mut dyn BatchSource,
        aug: &AugmentConfig,
        device: &Device,
    ) -> Result<Ready> {
        match self {
            Stager::Host(buf) => {
                let staged = src.next_staged(aug, buf)?;
                if device.is_cpu() {
                    Ok(Ready::Done(FedBatch::upload(
                        staged,
                        &buf.upload(device),
                        aug,
                    )?))
                } else {
                    Ok(Ready::Host(staged, std::mem::take(buf)))
                }
            }
            #[cfg(feature = "cuda")]
            Stager::Cuda(c) => {
                let r = c.next(src, aug);
                if c.failed() {
                    *self = Stager::Host(HostStage::default());
                }
                r
            }
        }
    }
}

impl Prefetch {
    /// Prefetches `source`'s batches onto `device` (the device `next` is asked for).
    pub fn new(mut source: Box<dyn BatchSource>, device: &Device) -> Self {
        Self {
            n_samples: BatchSource::n_samples(&source),
            dataset_id: BatchSource::dataset_id(&source),
            names: source.take_record_names(),
            device: device.clone(),
            state: State::Idle(source),
        }
    }

    fn start(&self, mut src: Box<dyn BatchSource>, aug: &AugmentConfig) -> Result<Worker> {
        // Rendezvous: the worker holds one finished batch until it is taken, so it is never
        // more than one batch ahead.
        let (tx, ready) = sync_channel(0);
        #[cfg(feature = "cuda")]
        let (mut stager, returns) = stager_for(&self.device);
        #[cfg(not(feature = "cuda"))]
        let mut stager = Stager::Host(HostStage::default());
        let (aug, device) = (aug.clone(), self.device.clone());
        let handle = std::thread::Builder::new()
            .name("batch-prefetch".into())
            .spawn(move || loop {
                let r = stager.next(src.as_mut(), &aug, &device);
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return src;
                }
            })?;
        Ok(Worker {
            ready,
            handle,
            #[cfg(feature = "cuda")]
            returns,
        })
    }

    /// Stops the worker (it finishes the batch it is staging) and takes the source back.
    fn stop(&mut self) -> Result<()> {
        if !matches!(self.state, State::Running(_)) {
            return Ok(());
        }
        if let State::Running(w) = std::mem::replace(&mut self.state, State::Lost) {
            // Device memory the worker frees must no longer be read by the device's stream.
            let synced = self.device.synchronize();
            drop(w.ready);
            // A worker waiting for a device slot learns that none will come back.
            #[cfg(feature = "cuda")]
            drop(w.returns);
            self.state = match w.handle.join() {
                Ok(src) => State::Idle(src),
                Err(_) => bail!("the batch prefetch thread panicked"),
            };
            synced?;
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn stager_for(device: &Device) -> (Stager, Option<cuda::Returns>) {
    match device {
        Device::Cuda(d) => match cuda::pair(d) {
            Ok((s, r)) => (Stager::Cuda(s), Some(r)),
            Err(e) => {
                cuda::warn_once(&e);
                (Stager::Host(HostStage::default()), None)
            }
        },
        _ => (Stager::Host(HostStage::default()), None),
    }
}

impl BatchFeed for Prefetch {
    fn n_samples(&self) -> u64 {
        self.n_samples
    }
    fn dataset_id(&self) -> u64 {
        self.dataset_id
    }
    fn seek(&mut self, epoch: u64, batch: u64) -> Result<()> {
        self.stop()?;
        match &mut self.state {
            State::Idle(src) => BatchSource::seek(src, epoch, batch),
            _ => bail!("the batch prefetch thread panicked"),
        }
    }
    fn next(&mut self, aug: &AugmentConfig, device: &Device) -> Result<FedBatch> {
        if let State::Idle(_) = self.state {
            let State::Idle(src) = std::mem::replace(&mut self.state, State::Lost) else {
                unreachable!()
            };
            self.state = State::Running(self.start(src, aug)?);
        }
        let State::Running(w) = &mut self.state else {
            bail!("the batch prefetch thread panicked");
        };
        let ready = match w.ready.recv() {
            Ok(Ok(r)) => r,
            // The worker returned after sending the source's error: the source stays at the
            // failed batch, as a plain feed would.
            Ok(Err(e)) => {
                self.stop()?;
                return Err(e);
            }
            Err(_) => {
                self.stop()?;
                return Err(anyhow!("the batch prefetch thread stopped"));
            }
        };
        match ready {
            Ready::Done(fed) => Ok(fed),
            Ready::Host(staged, buf) => FedBatch::upload(staged, &buf.upload(device), aug),
            #[cfg(feature = "cuda")]
            Ready::Device(p) => match &w.returns {
                Some(r) => r.finish(p, aug),
                None => unreachable!("device batches come with their returns"),
            },
        }
    }
    fn record_name(&self, index: u64) -> String {
        record_name(self.names.as_ref(), index)
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
