//! AdamW with parameter groups, gradient-norm clipping and a cosine schedule with warm-up.
//!
//! Semantics follow PyTorch (`torch.optim.AdamW`, `torch.nn.utils.clip_grad_norm_`): decoupled
//! weight decay, bias-corrected moments and a per-parameter step count (a parameter without a
//! gradient is skipped and its step count does not advance).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};

/// A set of parameters sharing a learning rate and a weight decay.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// The trainable variables of this group.
    pub vars: Vec<Var>,
    /// Base learning rate (multiplied by the optimiser's lr scale at every step).
    pub lr: f64,
    /// Decoupled weight decay coefficient (`p ← p − lr·wd·p`).
    pub weight_decay: f64,
}

/// Hyper-parameters shared by all groups (PyTorch defaults: betas (0.9, 0.999), eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the bias-corrected RMS before dividing.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Moments and step count of one parameter.
#[derive(Debug, Clone)]
struct ParamState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW over several parameter groups, with a global lr scale for schedules.
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<ParamGroup>,
    states: Vec<Vec<ParamState>>,
    config: AdamWConfig,
    lr_scale: f64,
}

/// Key prefix of one parameter's state in `state_tensors` / `load_state`.
fn state_key(group: usize, index: usize, field: &str) -> String {
    format!("group{group}.param{index}.{field}")
}

impl AdamW {
    /// Creates the optimiser with zeroed moments (lr scale 1).
    pub fn new(groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<Self> {
        let states = groups
            .iter()
            .map(|g| {
                g.vars
                    .iter()
                    .map(|v| {
                        Ok(ParamState {
                            exp_avg: v.as_tensor().zeros_like()?,
                            exp_avg_sq: v.as_tensor().zeros_like()?,
                            step: 0,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            groups,
            states,
            config,
            lr_scale: 1.0,
        })
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Sets the factor every group's base lr is multiplied by (e.g. `CosineSchedule::factor`).
    pub fn set_lr_scale(&mut self, scale: f64) {
        self.lr_scale = scale;
    }

    /// The current lr scale.
    pub fn lr_scale(&self) -> f64 {
        self.lr_scale
    }

    /// Sets the base lr of group `group`.
    pub fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        match self.groups.get_mut(group) {
            Some(g) => {
                g.lr = lr;
                Ok(())
            }
            None => bail!("AdamW has no parameter group {group}"),
        }
    }

    /// One AdamW update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps } = self.config;
        for (group, states) in self.groups.iter().zip(self.states.iter_mut()) {
            let lr = group.lr * self.lr_scale;
            for (var, state) in group.vars.iter().zip(states.iter_mut()) {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let grad = grad.detach();
                state.step += 1;
                let bias_correction1 = 1.0 - beta1.powf(state.step as f64);
                let bias_correction2 = 1.0 - beta2.powf(state.step as f64);

                state.exp_avg = state
                    .exp_avg
                    .affine(beta1, 0.0)?
                    .add(&grad.affine(1.0 - beta1, 0.0)?)?;
                state.exp_avg_sq = state
                    .exp_avg_sq
                    .affine(beta2, 0.0)?
                    .add(&grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;

                let mut p = var.as_tensor().detach();
                if group.weight_decay != 0.0 {
                    p = p.affine(1.0 - lr * group.weight_decay, 0.0)?;
                }
                let denom = state
                    .exp_avg_sq
                    .sqrt()?
                    .affine(1.0 / bias_correction2.sqrt(), eps)?;
                let update = state
                    .exp_avg
                    .div(&denom)?
                    .affine(lr / bias_correction1, 0.0)?;
                var.set(&p.sub(&update)?)?;
            }
        }
        Ok(())
    }

    /// The optimiser state as named tensors: `group{g}.param{i}.exp_avg`, `.exp_avg_sq` (parameter
    /// dtype) and `.step` (i64 scalar), for saving and bit-exact resumption with `load_state`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (g, states) in self.states.iter().enumerate() {
            for (i, s) in states.iter().enumerate() {
                let step = i64::try_from(s.step).unwrap_or(i64::MAX);
                let dev = s.exp_avg.device();
                out.push((state_key(g, i, "exp_avg"), s.exp_avg.clone()));
                out.push((state_key(g, i, "exp_avg_sq"), s.exp_avg_sq.clone()));
                out.push((state_key(g, i, "step"), Tensor::new(step, dev)?));
            }
        }
        Ok(out)
    }

    /// Restores the state written by `state_tensors`; every key must be present with the
    /// parameter's shape (moments are converted to the parameter dtype and device).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String| match state.get(&key) {
            Some(t) => Ok(t),
            None => bail!("optimizer state is missing `{key}`"),
        };
        let mut loaded = Vec::with_capacity(self.states.len());
        for (g, group) in self.groups.iter().enumerate() {
            let mut group_states = Vec::with_capacity(group.vars.len());
            for (i, var) in group.vars.iter().enumerate() {
                let moment = |field: &str| -> Result<Tensor> {
                    let key = state_key(g, i, field);
                    let t = get(key.clone())?;
                    if t.shape() != var.shape() {
                        bail!(
                            "optimizer state `{key}` has shape {:?}, parameter has {:?}",
                            t.shape(),
                            var.shape()
                        );
                    }
                    t.to_dtype(var.dtype())?.to_device(var.device())
                };
                let exp_avg = moment("exp_avg")?;
                let exp_avg_sq = moment("exp_avg_sq")?;
                let step_key = state_key(g, i, "step");
                let step = get(step_key.clone())?
                    .to_dtype(DType::I64)?
                    .to_scalar::<i64>()?;
                let Ok(step) = u64::try_from(step) else {
                    bail!("optimizer state `{step_key}` is negative ({step})");
                };
                group_states.push(ParamState {
                    exp_avg,
                    exp_avg_sq,
                    step,
                });
            }
            loaded.push(group_states);
        }
        self.states = loaded;
        Ok(())
    }
}

/// Scales the gradients of `vars` in place so their global L2 norm is at most `max_norm`
/// (PyTorch `clip_grad_norm_`: factor `max_norm/(norm + 1e-6)` when below 1); returns the pre-clip
/// norm.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum_sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let total_norm = sum_sq.sqrt();
    let coef = max_norm / (total_norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = g.affine(coef, 0.0)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(total_norm)
}

/// Learning-rate factor: linear warm-up 0→1 over `warmup_steps`, then cosine 1→`min_ratio` at
/// `total_steps` (held at `min_ratio` afterwards).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    /// Steps of linear warm-up (factor `step / warmup_steps`).
    pub warmup_steps: usize,
    /// Step at which the cosine reaches `min_ratio`.
    pub total_steps: usize,
    /// Final factor.
    pub min_ratio: f64,
}

impl CosineSchedule {
    /// The lr factor at `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps as f64;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps);
        let progress = if decay == 0 {
            1.0
        } else {
            ((step - self.warmup_steps) as f64 / decay as f64).min(1.0)
        };
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_ratio + (1.0 - self.min_ratio) * cosine
    }
}
