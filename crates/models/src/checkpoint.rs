//! Checkpoint loading by official key names (`.pth`/`.pt` torch zip pickles, `.safetensors`) and the
//! var-builder backends that check every key and shape, mark trainable tensors and can build a
//! model from zeros or random values without a file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::ModelError;

/// Keys of official checkpoints that the image path never uses, by prefix: TinyViT's classifier
/// (`head`, `norm_head`) and BatchNorm step counters.
pub const IGNORED_KEY_PATTERNS: &[&str] = &[
    "image_encoder.head.",
    "image_encoder.norm_head.",
    ".num_batches_tracked",
];

/// True when `key` is one of [`IGNORED_KEY_PATTERNS`].
pub fn is_ignored_key(key: &str) -> bool {
    IGNORED_KEY_PATTERNS.iter().any(|p| {
        if p.starts_with('.') {
            key.ends_with(p)
        } else {
            key.starts_with(p)
        }
    })
}

/// All tensors of one weights file, by official key name.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file the tensors came from (for error messages).
    pub path: String,
    /// Tensors by key.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads `.safetensors`, or a torch `.pth`/`.pt` zip pickle holding a plain state dict or
    /// `{'model': state_dict}` (SAM 2 layout).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let err = |reason: String| ModelError::Weights {
            path: shown.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let tensors: HashMap<String, Tensor> = match ext.as_str() {
            "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| err(format!("not a readable safetensors file ({e})")))?,
            "pth" | "pt" | "bin" | "ckpt" => read_torch(path).map_err(err)?,
            other => {
                return Err(err(format!(
                    "unsupported extension `.{other}` (expected .pth, .pt or .safetensors)"
                )))
            }
        };
        if tensors.is_empty() {
            return Err(err("the file holds no tensors".into()));
        }
        Ok(Self {
            path: shown,
            tensors,
        })
    }

    /// Sorted key list.
    pub fn keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.tensors.keys().map(|s| s.as_str()).collect();
        k.sort_unstable();
        k
    }

    /// Total number of scalar elements over all tensors.
    pub fn num_elements(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }
}

fn read_torch(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let read = |key: Option<&str>| -> Result<HashMap<String, Tensor>, String> {
        let pth = candle_core::pickle::PthTensors::new(path, key)
            .map_err(|e| format!("not a readable torch checkpoint ({e})"))?;
        let mut out = HashMap::new();
        for name in pth.tensor_infos().keys() {
            let t = pth
                .get(name)
                .map_err(|e| format!("tensor `{name}` cannot be read ({e})"))?;
            if let Some(t) = t {
                out.insert(name.clone(), t);
            }
        }
        Ok(out)
    };
    let plain = read(None)?;
    if !plain.is_empty() {
        return Ok(plain);
    }
    // SAM 2 checkpoints wrap the state dict as {'model': state_dict}.
    read(Some("model"))
}

/// Where a [`WeightsBackend`] takes its tensors from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An official checkpoint; every requested key must exist with the requested shape.
    File(Arc<Checkpoint>),
    /// Zeros of the requested shape, allocated lazily by broadcasting one scalar (for
    /// architecture checks of very large models).
    Zeros,
    /// Seeded random normal values scaled by `std` (benchmarks and tiny test models).
    Random {
        /// Seed of the generator.
        seed: u64,
        /// Standard deviation.
        std: f64,
    },
    /// Fresh parameters drawn from each module's own init hint (constant, normal, uniform,
    /// Kaiming), seeded per key so a model is the same on every machine and in every build order.
    Init {
        /// Seed of the generator.
        seed: u64,
    },
}

/// A 64-bit seed for one key: FNV-style mixing of the key into `seed`.
fn key_seed(seed: u64, name: &str) -> u64 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Values for `init` of `shape`, deterministic in `seed`.
fn init_tensor(shape: &Shape, init: candle_nn::Init, seed: u64) -> candle_core::Result<Tensor> {
    use candle_nn::init::NormalOrUniform;
    let dev = &Device::Cpu;
    Ok(match init {
        candle_nn::Init::Const(v) => (Tensor::ones(shape, DType::F32, dev)? * v)?,
        candle_nn::Init::Randn { mean, stdev } => (random_normal(shape, seed, stdev)? + mean)?,
        candle_nn::Init::Uniform { lo, up } => random_uniform(shape, seed, lo, up)?,
        candle_nn::Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    random_uniform(shape, seed, -bound, bound)?
                }
                NormalOrUniform::Normal => random_normal(shape, seed, std)?,
            }
        }
    })
}

type Predicate = Box<dyn Fn(&str) -> bool + Send + Sync>;

struct Inner {
    source: Source,
    used: Mutex<BTreeMap<String, Vec<usize>>>,
    trainable: Predicate,
    vars: Mutex<Vec<(String, Var)>>,
}

/// A var-builder backend that validates keys and shapes, records every key the model asked for and
/// turns trainable keys into [`Var`]s (so gradients reach them).
#[derive(Clone)]
pub struct WeightsBackend {
    inner: Arc<Inner>,
}

impl WeightsBackend {
    /// A backend over `source`; keys for which `trainable` is true become variables.
    pub fn new(source: Source, trainable: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                used: Mutex::new(BTreeMap::new()),
                trainable: Box::new(trainable),
                vars: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A frozen backend over a checkpoint file.
    pub fn frozen(ckpt: Arc<Checkpoint>) -> Self {
        Self::new(Source::File(ckpt), |_| false)
    }

    /// A var builder (f32, given device) that reads through this backend.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// The checkpoint behind this backend, when it reads a file.
    pub fn checkpoint(&self) -> Option<Arc<Checkpoint>> {
        match &self.inner.source {
            Source::File(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Every key the model asked for, with its shape.
    pub fn used(&self) -> BTreeMap<String, Vec<usize>> {
        self.inner
            .used
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// The trainable variables created so far, by key.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.inner
            .vars
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// After building a model from a file: fails on the first file key (sorted) that no module
    /// asked for, unless it is ignored or under one of `allowed_prefixes` (parts not built).
    pub fn check_unexpected(&self, allowed_prefixes: &[&str]) -> Result<(), ModelError> {
        let Source::File(ckpt) = &self.inner.source else {
            return Ok(());
        };
        let used = self.used();
        let unexpected = ckpt
            .keys()
            .into_iter()
            .filter(|k| !used.contains_key(*k) && !is_ignored_key(k))
            .find(|k| !allowed_prefixes.iter().any(|p| k.starts_with(p)));
        match unexpected {
            None => Ok(()),
            Some(k) => Err(ModelError::Weights {
                path: ckpt.path.clone(),
                reason: format!(
                    "unexpected key `{k}` (shape {:?}): the file is not this model variant",
                    ckpt.tensors[k].dims()
                ),
            }),
        }
    }
}

impl SimpleBackend for WeightsBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match &self.inner.source {
            Source::File(ckpt) => {
                let Some(t) = ckpt.tensors.get(name) else {
                    candle_core::bail!(
                        "weights file {}: missing key `{name}` (expected shape {:?})",
                        ckpt.path,
                        s.dims()
                    )
                };
                if t.dims() != s.dims() {
                    candle_core::bail!(
                        "weights file {}: key `{name}` has shape {:?}, the model expects {:?}",
                        ckpt.path,
                        t.dims(),
                        s.dims()
                    )
                }
                t.to_dtype(dtype)?.to_device(dev)?
            }
            Source::Zeros => Tensor::zeros((), dtype, dev)?.broadcast_as(s.clone())?,
            Source::Random { seed, std } => random_normal(&s, key_seed(*seed, name), *std)?
                .to_dtype(dtype)?
                .to_device(dev)?,
            Source::Init { seed } => init_tensor(&s, h, key_seed(*seed, name))?
                .to_dtype(dtype)?
                .to_device(dev)?,
        };
        if let Ok(mut used) = self.inner.used.lock() {
            used.insert(name.to_string(), s.dims().to_vec());
        }
        if (self.inner.trainable)(name) {
            let var = Var::from_tensor(&t.contiguous()?)?;
            let out = var.as_tensor().clone();
            if let Ok(mut vars) = self.inner.vars.lock() {
                vars.push((name.to_string(), var));
            }
            return Ok(out);
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.inner.source {
            Source::File(ckpt) => match ckpt.tensors.get(name) {
                Some(t) => t.to_dtype(dtype)?.to_device(dev),
                None => candle_core::bail!("weights file {}: missing key `{name}`", ckpt.path),
            },
            _ => candle_core::bail!("key `{name}` needs a shape when no weights file is given"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.inner.source {
            Source::File(ckpt) => ckpt.tensors.contains_key(name),
            _ => true,
        }
    }
}

/// SplitMix64 uniform draws in [0, 1): tiny, seedable and identical on every platform.
fn uniform01(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Deterministic U(lo, up) values from a 64-bit seed.
fn random_uniform(shape: &Shape, seed: u64, lo: f64, up: f64) -> candle_core::Result<Tensor> {
    let mut next = uniform01(seed);
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| (lo + (up - lo) * next()) as f32)
        .collect();
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// Deterministic N(0, std²) values from a 64-bit seed (SplitMix64 + Box-Muller), so random-weight
/// models are identical on every machine.
fn random_normal(shape: &Shape, seed: u64, std: f64) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    let mut next = uniform01(seed);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let u1 = next().max(1e-300);
        let u2 = next();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        v.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
        v.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
    }
    v.truncate(n);
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// The distinct key set of a model built from zeros, compared with an expected key → shape list;
/// returns human-readable differences (empty when identical).
pub fn diff_key_shapes(
    built: &BTreeMap<String, Vec<usize>>,
    expected: &BTreeMap<String, Vec<usize>>,
) -> Vec<String> {
    let mut out = Vec::new();
    let a: BTreeSet<&String> = built.keys().collect();
    let b: BTreeSet<&String> = expected.keys().collect();
    for k in b.difference(&a) {
        out.push(format!("not built: {k} {:?}", expected[*k]));
    }
    for k in a.difference(&b) {
        out.push(format!("not in manifest: {k} {:?}", built[*k]));
    }
    for k in a.intersection(&b) {
        if built[*k] != expected[*k] {
            out.push(format!(
                "shape of {k}: built {:?}, manifest {:?}",
                built[*k], expected[*k]
            ));
        }
    }
    out
}
