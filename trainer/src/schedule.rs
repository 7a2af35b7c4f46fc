//! Per-iteration schedules (udi-spec §4), closed forms of DINO's `cosine_scheduler` arrays:
//!
//! * warm-up (iterations `0..W`, W = warmup_epochs·iters_per_epoch): `np.linspace(start, base, W)`,
//!   i.e. start + (base − start)·i/(W − 1);
//! * then, with T = epochs·iters_per_epoch − W and t = i − W:
//!   final + ½(base − final)(1 + cos(π t / T)).
//! * The teacher temperature is per epoch: linspace(warm, final, E_w) then final.

use crate::config::TrainConfig;

/// DINO's `cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs, start_warmup)[it]`.
/// Iterations past the end repeat the last value (the official arrays would index out of range).
pub fn cosine(
    base: f64,
    final_v: f64,
    total_iters: u64,
    warmup_iters: u64,
    start_warmup: f64,
    it: u64,
) -> f64 {
    let it = it.min(total_iters.saturating_sub(1));
    if it < warmup_iters {
        if warmup_iters == 1 {
            return start_warmup;
        }
        return start_warmup + (base - start_warmup) * it as f64 / (warmup_iters - 1) as f64;
    }
    let t = (it - warmup_iters) as f64;
    let len = (total_iters - warmup_iters) as f64;
    final_v + 0.5 * (base - final_v) * (1.0 + (std::f64::consts::PI * t / len).cos())
}

/// All schedules of one run.
#[derive(Clone, Debug)]
pub struct Schedules {
    pub iters_per_epoch: u64,
    pub total_iters: u64,
    peak_lr: f64,
    cfg: TrainConfig,
}

impl Schedules {
    pub fn new(cfg: &TrainConfig, iters_per_epoch: u64) -> Self {
        let ipe = iters_per_epoch.max(1);
        Self {
            iters_per_epoch: ipe,
            total_iters: cfg.optim.epochs * ipe,
            peak_lr: cfg.peak_lr(),
            cfg: cfg.clone(),
        }
    }
    /// The peak lr for a global batch other than `data.batch_size` (data-parallel training,
    /// gradient accumulation): `lr × global_batch / 256`.
    pub fn with_global_batch(mut self, global_batch: u64) -> Self {
        self.peak_lr = self.cfg.optim.lr * global_batch as f64 / 256.0;
        self
    }

    /// The four scheduled values of one iteration: (lr, weight decay, teacher EMA momentum,
    /// teacher temperature), the first three by global step, τ_t by epoch.
    pub fn at(&self, epoch: u64, global_step: u64) -> (f64, f64, f64, f64) {
        (
            self.lr(global_step),
            self.weight_decay(global_step),
            self.momentum(global_step),
            self.teacher_temp(epoch),
        )
    }

    pub fn lr(&self, it: u64) -> f64 {
        let o = &self.cfg.optim;
        cosine(
            self.peak_lr,
            o.min_lr,
            self.total_iters,
            o.warmup_epochs * self.iters_per_epoch,
            0.0,
            it,
        )
    }
    pub fn weight_decay(&self, it: u64) -> f64 {
        let o = &self.cfg.optim;
        cosine(
            o.weight_decay,
            o.weight_decay_end,
            self.total_iters,
            0,
            0.0,
            it,
        )
    }
    pub fn momentum(&self, it: u64) -> f64 {
        cosine(
            self.cfg.optim.momentum_teacher,
            1.0,
            self.total_iters,
            0,
            0.0,
            it,
        )
    }
    /// `np.concatenate((np.linspace(warm, final, E_w), np.ones(E − E_w)·final))[epoch]`.
    pub fn teacher_temp(&self, epoch: u64) -> f64 {
        let l = &self.cfg.loss;
        let ew = l.warmup_teacher_temp_epochs;
        if epoch >= ew {
            l.teacher_temp
        } else if ew == 1 {
            l.warmup_teacher_temp
        } else {
            l.warmup_teacher_temp
                + (l.teacher_temp - l.warmup_teacher_temp) * epoch as f64 / (ew - 1) as f64
        }
    }
}
