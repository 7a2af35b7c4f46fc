//! AdamW exactly as PyTorch's (udi-spec §4), per-parameter gradient clipping, and the
//! teacher EMA.
//!
//! PyTorch AdamW per element, with step t counted **per parameter** (so the last layer, frozen
//! during epoch 0, starts its bias correction at t = 1 in epoch 1):
//! `θ ← θ(1 − lr·wd); m ← m + (1−β₁)(g − m); v ← β₂v + (1−β₂)g²;
//!  θ ← θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.

use crate::kernels::adamw::{meta_tensor, AdamwEma, Segment};
use crate::params::ParamStore;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// Adam moments of one parameter.
pub struct AdamState {
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW over one [`ParamStore`] (state indexed like the store; `None` = never updated yet).
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub states: Vec<Option<AdamState>>,
}

impl AdamW {
    pub fn new(n_params: usize, beta1: f64, beta2: f64, eps: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            states: (0..n_params).map(|_| None).collect(),
        }
    }

    /// One update of parameter `i` with gradient `grad` (same shape and dtype).
    pub fn update(&mut self, i: usize, var: &Var, grad: &Tensor, lr: f64, wd: f64) -> Result<()> {
        let (b1, b2) = (self.beta1, self.beta2);
        let st = self.states[i].get_or_insert_with(|| AdamState {
            step: 0,
            exp_avg: grad.zeros_like().expect("zeros"),
            exp_avg_sq: grad.zeros_like().expect("zeros"),
        });
        st.step += 1;
        let p = var.as_tensor();
        let p = if wd != 0.0 {
            (p * (1.0 - lr * wd))?
        } else {
            p.detach()
        };
        // lerp(m, g, 1−β₁) = m + (1−β₁)(g − m)
        st.exp_avg = (&st.exp_avg + ((grad - &st.exp_avg)? * (1.0 - b1))?)?;
        st.exp_avg_sq = ((&st.exp_avg_sq * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
        let bc1 = 1.0 - b1.powi(st.step as i32);
        let bc2 = 1.0 - b2.powi(st.step as i32);
        let step_size = lr / bc1;
        let denom = ((st.exp_avg_sq.sqrt()? / bc2.sqrt())? + self.eps)?;
        let new = (p - (st.exp_avg.div(&denom)? * step_size)?)?;
        var.set(&new)?;
        Ok(())
    }

    /// Every AdamW update of one step plus the teacher EMA in one multi-tensor launch
    /// ([`AdamwEma`]) over flat buffers: `grads[i] = Some((raw gradient, clip factor, weight
    /// decay))` for the parameters updated this step, `None` for the others (no update and no
    /// Adam state, e.g. the frozen last layer); the EMA `θ_t ← m·θ_t + (1 − m)·θ_s` covers every
    /// parameter, after the update. Same arithmetic as [`Self::update`] + [`ema_update`]
    /// (in f32, so equal up to rounding). The moments afterwards are views of the flat buffer.
    pub fn fused_update_ema(
        &mut self,
        student: &ParamStore,
        teacher: &ParamStore,
        grads: &[Option<(Tensor, f64, f64)>],
        lr: f64,
        momentum: f64,
    ) -> Result<()> {
        let params = student.params();
        anyhow::ensure!(
            grads.len() == params.len() && teacher.len() == params.len(),
            "fused AdamW: {} gradients for {} parameters",
            grads.len(),
            params.len()
        );
        let n: usize = params.iter().map(|p| p.var.elem_count()).sum();
        let (b1, b2) = (self.beta1, self.beta2);
        let mut segs = Vec::with_capacity(params.len());
        let (mut ps, mut ms, mut vs, mut ts, mut gs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut off = 0;
        for (i, p) in params.iter().enumerate() {
            let len = p.var.elem_count();
            let flat = |t: &Tensor| t.flatten_all();
            ps.push(flat(p.var.as_tensor())?.detach());
            ts.push(flat(teacher.params()[i].var.as_tensor())?.detach());
            let mut seg = Segment {
                offset: off,
                len,
                update: false,
                decay: 1.0,
                step_size: 0.0,
                bc2_sqrt: 1.0,
                clip: 1.0,
            };
            match &grads[i] {
                Some((g, clip, wd)) => {
                    let st = self.states[i].get_or_insert_with(|| AdamState {
                        step: 0,
                        exp_avg: g.zeros_like().expect("zeros"),
                        exp_avg_sq: g.zeros_like().expect("zeros"),
                    });
                    st.step += 1;
                    let bc1 = 1.0 - b1.powi(st.step as i32);
                    let bc2 = 1.0 - b2.powi(st.step as i32);
                    seg.update = true;
                    seg.decay = (1.0 - lr * wd) as f32;
                    seg.step_size = (lr / bc1) as f32;
                    seg.bc2_sqrt = bc2.sqrt() as f32;
                    seg.clip = *clip as f32;
                    gs.push(flat(g)?.to_dtype(p.var.dtype())?);
                    ms.push(flat(&st.exp_avg)?);
                    vs.push(flat(&st.exp_avg_sq)?);
                }
                None => {
                    let z = Tensor::zeros(len, p.var.dtype(), p.var.device())?;
                    gs.push(z.clone());
                    match &self.states[i] {
                        Some(st) => {
                            ms.push(flat(&st.exp_avg)?);
                            vs.push(flat(&st.exp_avg_sq)?);
                        }
                        None => {
                            ms.push(z.clone());
                            vs.push(z);
                        }
                    }
                }
            }
            segs.push(seg);
            off += len;
        }
        let mut all = ps;
        all.extend(ms);
        all.extend(vs);
        all.extend(ts);
        let state = Tensor::cat(&all, 0)?;
        let g = Tensor::cat(&gs, 0)?;
        let dev = state.device().clone();
        let meta = meta_tensor(&segs, &dev)?;
        state.inplace_op3(
            &g,
            &meta,
            &AdamwEma {
                beta1: b1,
                beta2: b2,
                eps: self.eps,
                momentum,
            },
        )?;
        for (i, (p, seg)) in params.iter().zip(&segs).enumerate() {
            let shape = p.var.shape();
            let part = |k: usize| state.narrow(0, k * n + seg.offset, seg.len)?.reshape(shape);
            if seg.update {
                p.var.set(&part(0)?)?;
                let st = self.states[i].as_mut().expect("state created above");
                st.exp_avg = part(1)?;
                st.exp_avg_sq = part(2)?;
            }
            teacher.params()[i].var.set(&part(3)?)?;
        }
        Ok(())
    }

    /// `optim.<param>.exp_avg`, `optim.<param>.exp_avg_sq` (param dtype) and `optim.<param>.step`
    /// (I64 [1]) for every parameter that has state.
    pub fn named_tensors(&self, store: &ParamStore) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (p, st) in store.params().iter().zip(&self.states) {
            if let Some(st) = st {
                let dev = st.exp_avg.device();
                out.push((format!("optim.{}.exp_avg", p.name), st.exp_avg.clone()));
                out.push((
                    format!("optim.{}.exp_avg_sq", p.name),
                    st.exp_avg_sq.clone(),
                ));
                out.push((
                    format!("optim.{}.step", p.name),
                    Tensor::new(&[st.step as i64], dev)?,
                ));
            }
        }
        Ok(out)
    }

    /// Restores the state written by [`Self::named_tensors`] (absent entries = no state).
    pub fn load_from(
        &mut self,
        map: &HashMap<String, Tensor>,
        store: &ParamStore,
        what: &str,
    ) -> Result<()> {
        for (i, p) in store.params().iter().enumerate() {
            let key = format!("optim.{}.step", p.name);
            self.states[i] = match map.get(&key) {
                None => None,
                Some(step) => {
                    let step: Vec<i64> = step
                        .flatten_all()?
                        .to_vec1()
                        .with_context(|| format!("{what}: {key}"))?;
                    let get = |k: &str| -> Result<Tensor> {
                        let key = format!("optim.{}.{k}", p.name);
                        let t = map
                            .get(&key)
                            .with_context(|| format!("{what}: missing {key}"))?;
                        if t.dims() != p.var.dims() {
                            bail!(
                                "{what}: {key} has shape {:?}, expected {:?}",
                                t.dims(),
                                p.var.dims()
                            );
                        }
                        // `copy` so the state never aliases the caller's tensors.
                        Ok(t.to_dtype(p.var.dtype())?
                            .to_device(p.var.device())?
                            .copy()?)
                    };
                    Some(AdamState {
                        step: step[0] as u64,
                        exp_avg: get("exp_avg")?,
                        exp_avg_sq: get("exp_avg_sq")?,
                    })
                }
            };
        }
        Ok(())
    }
}

/// ‖g‖₂ of several tensors together, accumulated in f64.
pub fn joint_norm(grads: &[&Tensor]) -> Result<f64> {
    let mut s = 0.0;
    for g in grads {
        s += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

/// ‖g‖² of each tensor, accumulated in f64 exactly as [`joint_norm`] does, fetched from the
/// device in one transfer.
pub fn squared_norms(grads: &[&Tensor]) -> Result<Vec<f64>> {
    if grads.is_empty() {
        return Ok(Vec::new());
    }
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&sums, 0)?.to_vec1::<f64>()?)
}

/// Per-parameter clipping of one step (udi-spec §4), decided from the gradients' squared norms.
pub struct ClipPlan {
    /// ‖g‖ before clipping of every parameter with a gradient (a group's members alone, a
    /// single parameter its group's norm).
    pub pre: Vec<Option<f64>>,
    /// ‖g‖ after clipping (pre·factor) of every parameter the optimiser updates this step.
    pub post: Vec<Option<f64>>,
    /// The clipping factor of each parameter's group (1 where nothing is clipped).
    pub factor: Vec<f64>,
    /// The global norm before clipping, √Σ over groups.
    pub norm: f64,
}

/// Clips each group (parameter ids clipped on one joint norm) of the parameters whose squared
/// gradient norm `sq[i]` is known (accumulated in f64); `updated(i)` says whether parameter i is
/// updated this step (false: the frozen last layer, reported before clipping only).
pub fn clip_plan(
    groups: &[Vec<usize>],
    sq: &[Option<f64>],
    updated: impl Fn(usize) -> bool,
    clip: f64,
) -> ClipPlan {
    let n = sq.len();
    let mut plan = ClipPlan {
        pre: vec![None; n],
        post: vec![None; n],
        factor: vec![1.0; n],
        norm: 0.0,
    };
    let mut total_sq = 0.0;
    for group in groups {
        let members: Vec<(usize, f64)> = group
            .iter()
            .filter_map(|&i| sq[i].map(|s| (i, s)))
            .collect();
        if members.is_empty() {
            continue;
        }
        // Same arithmetic as `joint_norm`: Σ of the f64 squared norms, then √.
        let norm = members.iter().fold(0.0, |acc, (_, s)| acc + s).sqrt();
        total_sq += norm * norm;
        let f = clip_factor(norm, clip);
        let single = members.len() == 1;
        for (i, s) in members {
            // Post-clip norms are reported as pre·factor (saves two passes over each tensor).
            let own = if single { norm } else { s.sqrt() };
            plan.pre[i] = Some(own);
            plan.factor[i] = f;
            if updated(i) {
                plan.post[i] = Some(own * f);
            }
        }
    }
    plan.norm = total_sq.sqrt();
    plan
}

/// torch's `clip_gradients` factor: `clip/(norm + 1e-6)` when that is < 1, else 1.
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if clip <= 0.0 {
        return 1.0;
    }
    let c = clip / (norm + 1e-6);
    if c < 1.0 {
        c
    } else {
        1.0
    }
}

/// θ_t ← m·θ_t + (1 − m)·θ_s for every parameter.
pub fn ema_update(teacher: &ParamStore, student: &ParamStore, m: f64) -> Result<()> {
    for (t, s) in teacher.params().iter().zip(student.params()) {
        let new = ((t.var.as_tensor() * m)? + (s.var.as_detached_tensor() * (1.0 - m))?)?;
        t.var.set(&new)?;
    }
    Ok(())
}
