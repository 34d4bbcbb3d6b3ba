//! Generated B-mode ultrasound phantoms with label masks (`sam2rad phantom`).
//!
//! Each image is drawn from its own ChaCha8 stream (`seed`, stream = image index) and rendered
//! with platform-independent arithmetic, so a seed gives bit-identical files on every machine.
//! The scene is an echogenicity map (soft-tissue layers with muscle/tendon/fat texture, bright
//! fascia lines, bright speckle clusters, curved bone surfaces with posterior acoustic shadowing,
//! an optional hypoechoic bursa) that is turned into an image the way a scanner does it: random
//! scatterers weighted by the map, convolved with a Gaussian point-spread function (fully
//! developed speckle), envelope averaged over two scatterer draws (compounding), depth
//! attenuation with time-gain compensation, log compression.
//! The bone label is the bright cortical echo band under the surface, as in musculoskeletal
//! ultrasound annotations.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::detmath;
use crate::{DataError, Result};

/// A structure that can be labelled in the phantoms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PhantomClass {
    /// The bright cortical bone surface echo.
    Bone,
    /// A hypoechoic (dark) bursa-like fluid band above the bone.
    Bursa,
}

impl PhantomClass {
    /// Lower-case name, as used on the command line and in `phantom.json`.
    pub fn name(self) -> &'static str {
        match self {
            PhantomClass::Bone => "bone",
            PhantomClass::Bursa => "bursa",
        }
    }

    /// Parses a comma-separated list such as `bone,bursa`.
    pub fn parse_list(list: &str) -> Result<Vec<PhantomClass>> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect()
    }
}

impl fmt::Display for PhantomClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PhantomClass {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bone" => Ok(PhantomClass::Bone),
            "bursa" => Ok(PhantomClass::Bursa),
            other => Err(DataError::Config(format!(
                "unknown phantom class `{other}` (known: bone, bursa)"
            ))),
        }
    }
}

/// Settings of a phantom data set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhantomConfig {
    /// Number of training images.
    pub train: usize,
    /// Number of test images.
    pub test: usize,
    /// Master seed; the same seed gives bit-identical files.
    pub seed: u64,
    /// Labelled classes; class `classes[i]` has label value `i + 1` in the masks.
    pub classes: Vec<PhantomClass>,
    /// Fraction of images without bone (and without bursa): their masks are empty.
    pub empty_fraction: f64,
    /// Inclusive range of image widths in pixels.
    pub width_range: (usize, usize),
    /// Inclusive range of image heights in pixels.
    pub height_range: (usize, usize),
}

impl Default for PhantomConfig {
    fn default() -> Self {
        PhantomConfig {
            train: 100,
            test: 50,
            seed: 0,
            classes: vec![PhantomClass::Bone],
            empty_fraction: 0.1,
            width_range: (320, 640),
            height_range: (240, 480),
        }
    }
}

/// Smallest image side the renderer accepts.
const MIN_SIDE: usize = 64;
/// Largest image side the renderer accepts.
const MAX_SIDE: usize = 8192;

impl PhantomConfig {
    /// Checks the settings: at least one class, no duplicates, fraction in [0, 1], sane sizes.
    pub fn validate(&self) -> Result<()> {
        if self.classes.is_empty() {
            return Err(DataError::Config("phantom needs at least one class".into()));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if self.classes[..i].contains(c) {
                return Err(DataError::Config(format!(
                    "phantom class `{c}` given twice"
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.empty_fraction) {
            return Err(DataError::Config(format!(
                "empty fraction {} is not within 0..1",
                self.empty_fraction
            )));
        }
        for (name, (lo, hi)) in [("width", self.width_range), ("height", self.height_range)] {
            if lo > hi || lo < MIN_SIDE || hi > MAX_SIDE {
                return Err(DataError::Config(format!(
                    "phantom {name} range {lo}..{hi} must be increasing and within \
                     {MIN_SIDE}..{MAX_SIDE}"
                )));
            }
        }
        Ok(())
    }

    /// Label value of `class` in the masks, if it is labelled.
    pub fn label_of(&self, class: PhantomClass) -> Option<u8> {
        self.classes
            .iter()
            .position(|&c| c == class)
            .map(|i| i as u8 + 1)
    }
}

/// One rendered phantom: 8-bit grey image and label mask, row-major, same size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhantomImage {
    /// Grey pixels, `height * width` bytes.
    pub image: Vec<u8>,
    /// Label per pixel: 0 background, `i + 1` for `classes[i]`.
    pub mask: Vec<u8>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Test image `j` is rendered with index `TEST_INDEX_OFFSET + j` (train image `i` with `i`),
/// so the two splits are disjoint draws.
pub const TEST_INDEX_OFFSET: u64 = 1 << 32;

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhantomSummary {
    /// Output root (Layout A: `Train/{imgs,gts}`, `Test/{imgs,gts}`).
    pub out_dir: PathBuf,
    /// Training images written.
    pub train: usize,
    /// Test images written.
    pub test: usize,
    /// Images (both splits) whose mask is empty.
    pub empty: usize,
    /// Class names in label order (label 1 first).
    pub classes: Vec<String>,
}

/// Writes a Layout A phantom data set under `out_dir` (`Train/{imgs,gts}/case_0000.png`, ...,
/// `Test/...`, plus `phantom.json` with the settings and label names). Images render in
/// parallel, each from its own stream, so the output does not depend on the thread count;
/// every file is written atomically. Refuses folders holding files of another data set.
pub fn generate(cfg: &PhantomConfig, out_dir: &Path) -> Result<PhantomSummary> {
    cfg.validate()?;
    let mut empty = 0;
    for (split, count, offset) in [
        ("Train", cfg.train, 0),
        ("Test", cfg.test, TEST_INDEX_OFFSET),
    ] {
        let imgs = out_dir.join(split).join("imgs");
        let gts = out_dir.join(split).join("gts");
        for dir in [&imgs, &gts] {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            refuse_foreign_files(dir, count)?;
        }
        let empties = (0..count)
            .into_par_iter()
            .map(|i| {
                let p = render(cfg.seed, offset + i as u64, cfg);
                let name = format!("case_{i:04}.png");
                write_grey_png(&imgs.join(&name), &p.image, p.width, p.height)?;
                write_grey_png(&gts.join(&name), &p.mask, p.width, p.height)?;
                Ok(usize::from(p.mask.iter().all(|&v| v == 0)))
            })
            .collect::<Result<Vec<usize>>>()?;
        empty += empties.iter().sum::<usize>();
    }
    let summary = PhantomSummary {
        out_dir: out_dir.to_path_buf(),
        train: cfg.train,
        test: cfg.test,
        empty,
        classes: cfg.classes.iter().map(|c| c.name().to_string()).collect(),
    };
    let mut labels = serde_json::Map::new();
    labels.insert("background".into(), 0.into());
    for (i, c) in cfg.classes.iter().enumerate() {
        labels.insert(c.name().into(), (i + 1).into());
    }
    let meta = serde_json::json!({ "generator": "sam2rad phantom", "config": cfg,
                                   "labels": labels, "summary": &summary });
    let text = serde_json::to_string_pretty(&meta)
        .map_err(|e| DataError::Config(format!("cannot serialise phantom.json: {e}")))?;
    write_atomic(&out_dir.join("phantom.json"), text.as_bytes())?;
    Ok(summary)
}

/// Errors if `dir` holds visible files other than `case_0000.png .. case_{count-1}.png`, so a
/// rerun may overwrite its own output but never mixes with another data set.
fn refuse_foreign_files(dir: &Path, count: usize) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name
            .strip_prefix("case_")
            .and_then(|r| r.strip_suffix(".png"))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|i| i < count && name == format!("case_{i:04}.png"));
        if !ours && !name.starts_with('.') {
            return Err(DataError::Layout {
                path: dir.display().to_string(),
                reason: format!(
                    "already holds `{name}`, which this phantom run would not write; \
                     use an empty output folder"
                ),
            });
        }
    }
    Ok(())
}

/// Wraps an I/O error with its path.
fn io_err(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Encodes an 8-bit grey PNG and writes it atomically.
fn write_grey_png(path: &Path, pixels: &[u8], width: usize, height: usize) -> Result<()> {
    let mut bytes = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut bytes);
    image::ImageEncoder::write_image(
        encoder,
        pixels,
        width as u32,
        height as u32,
        image::ExtendedColorType::L8,
    )
    .map_err(|e| DataError::Image {
        path: path.display().to_string(),
        reason: format!("cannot encode PNG ({e})"),
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` atomically, naming `path` in any error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_bytes_atomic(path, bytes).map_err(|e| io_err(path, e))
}

/// Whether image `index` of a data set with this seed has no bone: a Weyl sequence keeps the
/// empty share within one image of `empty_fraction` for any number of images.
fn is_empty_image(seed: u64, index: u64, empty_fraction: f64) -> bool {
    let offset = detmath::splitmix64(seed ^ 0x5eed_0fe3_b7a5_1c2d);
    let u = index
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(offset);
    ((u >> 11) as f64 / (1u64 << 53) as f64) < empty_fraction
}

/// Renders image `index` of the data set with master `seed` (pure and deterministic).
/// Size ranges outside the accepted bounds are clamped.
pub fn render(seed: u64, index: u64, cfg: &PhantomConfig) -> PhantomImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let side = |(a, b): (usize, usize)| {
        let lo = a.min(b).clamp(MIN_SIDE, MAX_SIDE);
        (lo, a.max(b).clamp(lo, MAX_SIDE))
    };
    let (wl, wh) = side(cfg.width_range);
    let (hl, hh) = side(cfg.height_range);
    let width = rng.random_range(wl..=wh);
    let height = rng.random_range(hl..=hh);
    let empty = is_empty_image(seed, index, cfg.empty_fraction);
    let scene = Scene::sample(&mut rng, width, height, empty, cfg);
    scene.rasterise(&mut rng)
}

/// Independent speckle draws averaged per image (spatial compounding).
const LOOKS: usize = 2;

/// Number of entries of the sine lookup table used for textures.
const SIN_LUT: usize = 4096;

/// Texture of a soft-tissue layer.
#[derive(Debug, Clone, Copy)]
enum Texture {
    /// Hypoechoic, featureless (speckle only).
    Fat,
    /// Striated: `1 - depth + 4 depth max(0, sin(2pi (x*kx + y*ky + phase)))^6`: thin bright
    /// fibre sheaths on a darker background.
    Fibres {
        kx: f64,
        ky: f64,
        depth: f64,
        phase: f64,
    },
}

/// A soft-tissue layer below a boundary.
#[derive(Debug, Clone)]
struct Layer {
    level: f64,
    texture: Texture,
}

/// A thin bright line (fascia, skin, tendon sheath): per-column centre depth and amplitude.
#[derive(Debug, Clone)]
struct Line {
    y: Vec<f64>,
    amp: Vec<f64>,
    sigma: f64,
    coherent: f64,
}

/// A Gaussian bright spot (speckle cluster, fat septum).
#[derive(Debug, Clone)]
struct Blob {
    cx: f64,
    cy: f64,
    sx: f64,
    sy: f64,
    amp: f64,
}

/// A bone surface over the columns `x0..x1`: surface depth per column, echo band thickness,
/// brightness, lateral taper (0..1, ends fade out), shadow floor.
#[derive(Debug, Clone)]
struct Bone {
    x0: usize,
    x1: usize,
    surface: Vec<f64>,
    taper: Vec<f64>,
    thickness: f64,
    amp: f64,
    falloff: f64,
    coherent: f64,
    shadow: f64,
}

/// A hypoechoic lens-shaped band: per-column top and bottom (bottom <= top means absent).
#[derive(Debug, Clone)]
struct Bursa {
    top: Vec<f64>,
    bottom: Vec<f64>,
    level: f64,
    wall: f64,
}

/// Everything needed to rasterise one phantom.
#[derive(Debug, Clone)]
struct Scene {
    width: usize,
    height: usize,
    /// Layer boundaries (per column depth), sorted top to bottom.
    boundaries: Vec<Vec<f64>>,
    /// `boundaries.len() + 1` layers.
    layers: Vec<Layer>,
    lines: Vec<Line>,
    blobs: Vec<Blob>,
    bones: Vec<Bone>,
    bursa: Option<Bursa>,
    bone_label: u8,
    bursa_label: u8,
    /// Point-spread function sigmas (lateral, axial) in pixels.
    psf: (f64, f64),
    /// Attenuation minus time-gain compensation over the full depth (nepers, >0 darkens).
    net_attenuation: f64,
    /// Display: dB mapped to grey 0 and the dynamic range in dB.
    floor_db: f64,
    range_db: f64,
    /// Additive electronic noise amplitude.
    noise: f64,
}

/// Uniform float in `[lo, hi)`.
fn uni(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Smooth 0..1 ramp of `t` over 0..1.
fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// A smooth random curve: `base + slope*(x - w/2) + sum of two sines`, one value per column.
fn wavy_curve(rng: &mut ChaCha8Rng, width: usize, base: f64, slope: f64, amp: f64) -> Vec<f64> {
    let w = width as f64;
    let waves: Vec<(f64, f64, f64)> = (0..2)
        .map(|k| {
            let a = amp * uni(rng, 0.3, 1.0) / (k + 1) as f64;
            let period = w * uni(rng, 0.4, 1.5) / (k + 1) as f64;
            (a, period, uni(rng, 0.0, 1.0))
        })
        .collect();
    (0..width)
        .map(|x| {
            let xf = x as f64 + 0.5;
            let mut y = base + slope * (xf - w / 2.0);
            for &(a, period, phase) in &waves {
                y += a * detmath::sin(2.0 * std::f64::consts::PI * (xf / period + phase));
            }
            y
        })
        .collect()
}

impl Scene {
    /// Draws a random scene of the given size.
    fn sample(
        rng: &mut ChaCha8Rng,
        width: usize,
        height: usize,
        empty: bool,
        cfg: &PhantomConfig,
    ) -> Scene {
        let (w, h) = (width as f64, height as f64);
        let s = h / 384.0;
        // Soft-tissue layers: skin/subcutis, 2-4 fat/muscle/tendon layers.
        let n_bound = rng.random_range(2..=4usize);
        let mut depths: Vec<f64> = (0..n_bound).map(|_| uni(rng, 0.08, 0.75) * h).collect();
        depths.sort_by(f64::total_cmp);
        let common_slope = uni(rng, -0.08, 0.08);
        let mut boundaries: Vec<Vec<f64>> = Vec::with_capacity(n_bound);
        for &d in &depths {
            let slope = common_slope + uni(rng, -0.04, 0.04);
            let amp = uni(rng, 0.0, 0.04) * h;
            let mut b = wavy_curve(rng, width, d, slope, amp);
            if let Some(prev) = boundaries.last() {
                for (y, &p) in b.iter_mut().zip(prev) {
                    *y = y.max(p + 4.0 * s);
                }
            }
            boundaries.push(b);
        }
        let layers: Vec<Layer> = (0..=n_bound)
            .map(|i| {
                let kind = rng.random_range(0..3u32);
                if i == 0 || kind == 0 {
                    Layer {
                        level: uni(rng, 0.25, 0.5),
                        texture: Texture::Fat,
                    }
                } else {
                    // Muscle (coarse oblique fibres) or tendon (fine, brighter, flatter).
                    let tendon = kind == 2;
                    let angle = if tendon {
                        uni(rng, -0.12, 0.12)
                    } else {
                        uni(rng, -0.45, 0.45)
                    };
                    let period = if tendon {
                        uni(rng, 4.0, 7.0)
                    } else {
                        uni(rng, 8.0, 20.0)
                    } * s;
                    // Stripes run along `angle`; the wave vector is perpendicular to them.
                    let (sa, ca) = (detmath::sin(angle), detmath::cos(angle));
                    Layer {
                        level: if tendon {
                            uni(rng, 0.9, 1.4)
                        } else {
                            uni(rng, 0.5, 0.9)
                        },
                        texture: Texture::Fibres {
                            kx: -sa / period,
                            ky: ca / period,
                            depth: uni(rng, 0.3, 0.6),
                            phase: uni(rng, 0.0, 1.0),
                        },
                    }
                }
            })
            .collect();

        let bone_amp = uni(rng, 6.0, 10.0);
        // Bright thin lines: skin entry echo, fascia on most boundaries, extra tendon sheaths.
        let mut lines = Vec::new();
        let skin_y = uni(rng, 2.0, 6.0) * s;
        lines.push(Line {
            y: wavy_curve(rng, width, skin_y, 0.0, 1.0 * s),
            amp: vec![bone_amp * uni(rng, 0.5, 0.9); width],
            sigma: uni(rng, 1.0, 2.0) * s,
            coherent: 0.5,
        });
        let mut line_depths: Vec<&Vec<f64>> = boundaries.iter().collect();
        let extra: Vec<Vec<f64>> = (0..rng.random_range(0..=2usize))
            .map(|_| {
                let d = uni(rng, 0.1, 0.8) * h;
                let slope = uni(rng, -0.1, 0.1);
                let amp = uni(rng, 0.0, 0.03) * h;
                wavy_curve(rng, width, d, slope, amp)
            })
            .collect();
        line_depths.extend(extra.iter());
        for y in line_depths {
            if rng.random_bool(0.2) {
                continue;
            }
            let peak = bone_amp * uni(rng, 0.55, 1.1);
            // Fragmented brightness along the line, fading at random ends.
            let frag = wavy_curve(rng, width, 0.7, 0.0, 0.5);
            let (a, b) = if rng.random_bool(0.5) {
                (0.0, w)
            } else {
                let a = uni(rng, -0.3, 0.5) * w;
                (a, a + uni(rng, 0.4, 1.2) * w)
            };
            let amp = (0..width)
                .map(|x| {
                    let xf = x as f64 + 0.5;
                    let ends =
                        smoothstep((xf - a) / (20.0 * s)) * smoothstep((b - xf) / (20.0 * s));
                    peak * frag[x].clamp(0.15, 1.0) * ends
                })
                .collect();
            lines.push(Line {
                y: y.clone(),
                amp,
                sigma: uni(rng, 0.7, 1.6) * s,
                coherent: uni(rng, 0.2, 0.5),
            });
        }

        // Bright speckle clusters (as bright as bone) and dimmer fat septa.
        let mut blobs = Vec::new();
        for _ in 0..rng.random_range(4..=12usize) {
            blobs.push(Blob {
                cx: uni(rng, 0.0, w),
                cy: uni(rng, 0.05, 0.95) * h,
                sx: uni(rng, 2.5, 9.0) * s,
                sy: uni(rng, 1.5, 4.0) * s,
                amp: bone_amp * uni(rng, 0.5, 1.1),
            });
        }
        for _ in 0..rng.random_range(5..=25usize) {
            blobs.push(Blob {
                cx: uni(rng, 0.0, w),
                cy: uni(rng, 0.03, 0.97) * h,
                sx: uni(rng, 3.0, 12.0) * s,
                sy: uni(rng, 0.8, 2.0) * s,
                amp: uni(rng, 1.0, 3.0),
            });
        }

        // Bone surfaces: one, sometimes two side by side (a joint).
        let mut bones = Vec::new();
        if !empty {
            let n_bones = if rng.random_bool(0.3) { 2 } else { 1 };
            let cut = uni(rng, 0.35, 0.65) * w;
            let gap = uni(rng, 0.04, 0.12) * w;
            for k in 0..n_bones {
                let (lo, hi) = match (n_bones, k) {
                    (1, _) => {
                        let start = if rng.random_bool(0.5) {
                            -0.1 * w
                        } else {
                            uni(rng, 0.0, 0.3) * w
                        };
                        let end = if rng.random_bool(0.5) {
                            1.1 * w
                        } else {
                            uni(rng, 0.7, 1.0) * w
                        };
                        (start, end)
                    }
                    (_, 0) => (-0.1 * w, cut - gap / 2.0),
                    _ => (cut + gap / 2.0, 1.1 * w),
                };
                bones.push(Bone::sample(rng, width, height, lo, hi, bone_amp));
            }
        }

        let bone_label = cfg.label_of(PhantomClass::Bone).unwrap_or(0);
        let bursa_label = cfg.label_of(PhantomClass::Bursa).unwrap_or(0);
        let bursa = match bones.first() {
            Some(bone) if bursa_label > 0 && rng.random_bool(0.8) => {
                Some(Bursa::sample(rng, width, height, bone))
            }
            _ => None,
        };

        let attenuation = uni(rng, 1.0, 2.8);
        Scene {
            width,
            height,
            boundaries,
            layers,
            lines,
            blobs,
            bones,
            bursa,
            bone_label,
            bursa_label,
            psf: (uni(rng, 1.6, 2.8) * s, uni(rng, 0.7, 1.3) * s),
            net_attenuation: attenuation * uni(rng, 0.3, 0.8),
            floor_db: -uni(rng, 20.0, 26.0),
            range_db: uni(rng, 48.0, 60.0),
            noise: uni(rng, 0.04, 0.08),
        }
    }

    /// Turns the scene into the grey image and the label mask.
    fn rasterise(&self, rng: &mut ChaCha8Rng) -> PhantomImage {
        let (w, h) = (self.width, self.height);
        let n = w * h;
        // Incoherent (speckle-producing) and coherent (specular) echo amplitude per pixel.
        let mut inc = vec![0f32; n];
        let mut coh = vec![0f32; n];
        let mut mask = vec![0u8; n];
        // Fibre profile: thin bright peaks, `max(0, sin)^6`, mean about 0.156.
        let lut: Vec<f32> = (0..SIN_LUT)
            .map(|i| {
                let v = detmath::sin(2.0 * std::f64::consts::PI * i as f64 / SIN_LUT as f64);
                let v = v.max(0.0);
                (v * v * v * v * v * v) as f32
            })
            .collect();

        // Soft tissue layers.
        let mut layer_of = vec![0usize; w];
        for y in 0..h {
            let yf = y as f64 + 0.5;
            for (x, layer) in layer_of.iter_mut().enumerate() {
                while *layer < self.boundaries.len() && yf > self.boundaries[*layer][x] {
                    *layer += 1;
                }
                let l = &self.layers[*layer];
                let v = match l.texture {
                    Texture::Fat => l.level,
                    Texture::Fibres {
                        kx,
                        ky,
                        depth,
                        phase,
                    } => {
                        let v = x as f64 * kx + yf * ky + phase;
                        let t = v - floor_fast(v);
                        let idx = ((t * SIN_LUT as f64) as usize).min(SIN_LUT - 1);
                        l.level * (1.0 - depth + 4.0 * depth * lut[idx] as f64)
                    }
                };
                inc[y * w + x] = v as f32;
            }
        }

        // Thin bright lines.
        for line in &self.lines {
            let reach = 3.0 * line.sigma;
            let inv = -0.5 / (line.sigma * line.sigma);
            for x in 0..w {
                if line.amp[x] <= 0.0 {
                    continue;
                }
                let c = line.y[x];
                let y0 = (c - reach).floor().max(0.0) as usize;
                let y1 = ((c + reach).ceil().max(0.0) as usize).min(h);
                for y in y0..y1 {
                    let d = y as f64 + 0.5 - c;
                    let g = line.amp[x] * detmath::exp(d * d * inv);
                    inc[y * w + x] += (g * (1.0 - line.coherent)) as f32;
                    coh[y * w + x] += (g * line.coherent) as f32;
                }
            }
        }

        // Blobs.
        for b in &self.blobs {
            let (rx, ry) = (3.0 * b.sx, 3.0 * b.sy);
            let x0 = (b.cx - rx).floor().max(0.0) as usize;
            let x1 = ((b.cx + rx).ceil().max(0.0) as usize).min(w);
            let y0 = (b.cy - ry).floor().max(0.0) as usize;
            let y1 = ((b.cy + ry).ceil().max(0.0) as usize).min(h);
            for y in y0..y1 {
                let dy = (y as f64 + 0.5 - b.cy) / b.sy;
                for x in x0..x1 {
                    let dx = (x as f64 + 0.5 - b.cx) / b.sx;
                    let g = b.amp * detmath::exp(-0.5 * (dx * dx + dy * dy));
                    inc[y * w + x] += g as f32;
                }
            }
        }

        // Bursa: fluid replaces tissue; thin bright walls above and below.
        if let Some(bursa) = &self.bursa {
            for x in 0..w {
                let (top, bottom) = (bursa.top[x], bursa.bottom[x]);
                if bottom - top < 1.0 {
                    continue;
                }
                let y0 = (top - 4.0).floor().max(0.0) as usize;
                let y1 = ((bottom + 4.0).ceil().max(0.0) as usize).min(h);
                for y in y0..y1 {
                    let yf = y as f64 + 0.5;
                    let i = y * w + x;
                    if yf >= top && yf < bottom {
                        inc[i] = bursa.level as f32;
                        coh[i] = 0.0;
                        mask[i] = self.bursa_label;
                    } else {
                        let d = if yf < top { top - yf } else { yf - bottom };
                        inc[i] += (bursa.wall * detmath::exp(-0.5 * d * d)) as f32;
                    }
                }
            }
        }

        // Bones (disjoint column ranges): the echo band replaces tissue, everything deeper is
        // shadowed.
        let mut shadow_from = vec![f64::INFINITY; w];
        let mut shade = vec![1f32; w];
        for bone in &self.bones {
            for x in bone.x0..bone.x1 {
                let taper = bone.taper[x - bone.x0];
                if taper <= 0.0 {
                    continue;
                }
                let surf = bone.surface[x - bone.x0];
                let bottom = surf + bone.thickness;
                shadow_from[x] = bottom;
                shade[x] = (1.0 - (1.0 - bone.shadow) * taper) as f32;
                let y0 = (surf.floor().max(0.0) as usize).min(h);
                let y1 = (bottom.ceil().max(0.0) as usize).min(h);
                for y in y0..y1 {
                    let yf = y as f64 + 0.5;
                    if yf < surf || yf >= bottom {
                        continue;
                    }
                    let i = y * w + x;
                    let u = (yf - surf) / bone.thickness;
                    let e = bone.amp * detmath::exp(-bone.falloff * u);
                    let blend =
                        |old: f32, new: f64| (taper * new + (1.0 - taper) * old as f64) as f32;
                    inc[i] = blend(inc[i], e * (1.0 - bone.coherent));
                    coh[i] = blend(coh[i], e * bone.coherent);
                    if taper >= 0.5 && self.bone_label > 0 {
                        mask[i] = self.bone_label;
                    }
                }
            }
        }
        if !self.bones.is_empty() {
            for y in 0..h {
                let yf = y as f64 + 0.5;
                let row = y * w..(y + 1) * w;
                for (((a, b), &from), &k) in inc[row.clone()]
                    .iter_mut()
                    .zip(&mut coh[row])
                    .zip(&shadow_from)
                    .zip(&shade)
                {
                    if yf >= from {
                        *a *= k;
                        *b *= k;
                    }
                }
            }
        }

        let image = self.scan(rng, &inc, &coh);
        PhantomImage {
            image,
            mask,
            height: h,
            width: w,
        }
    }

    /// Scatterers, point-spread function, envelope, attenuation/gain and log compression.
    fn scan(&self, rng: &mut ChaCha8Rng, inc: &[f32], coh: &[f32]) -> Vec<u8> {
        let (w, h) = (self.width, self.height);
        let kl = gaussian_kernel(self.psf.0);
        let ka = gaussian_kernel(self.psf.1);
        let sum_sq: f64 = kl.iter().map(|&v| v as f64 * v as f64).sum::<f64>()
            * ka.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        // Uniform(-1,1) scatterers have variance 1/3; after the PSF the field's RMS envelope
        // equals the incoherent amplitude.
        let norm = (1.5 / sum_sq).sqrt() as f32;
        let noise = self.noise as f32;
        let mut re = vec![0f32; w * h];
        let mut im = vec![0f32; w * h];
        let mut envelope = vec![0f32; w * h];
        const SCALE: f32 = 1.0 / (1u64 << 31) as f32;
        // Compounding: the mean envelope of independent scatterer draws (fewer deep nulls).
        for _ in 0..LOOKS {
            for i in 0..w * h {
                let bits = rng.next_u64();
                let u1 = (bits as u32 as i32) as f32 * SCALE;
                let u2 = ((bits >> 32) as u32 as i32) as f32 * SCALE;
                let a = (inc[i] + noise) * norm;
                re[i] = a * u1 + coh[i];
                im[i] = a * u2;
            }
            let cre = convolve_separable(&re, w, h, &kl, &ka);
            let cim = convolve_separable(&im, w, h, &kl, &ka);
            for ((e, &a), &b) in envelope.iter_mut().zip(&cre).zip(&cim) {
                *e += (a * a + b * b).sqrt() / LOOKS as f32;
            }
        }
        let db_per_neper = 20.0 / std::f64::consts::LN_10;
        let scale = 255.0 / self.range_db;
        let mut out = vec![0u8; w * h];
        for (y, (row, env_row)) in out.chunks_mut(w).zip(envelope.chunks(w)).enumerate() {
            let row_db = -db_per_neper * self.net_attenuation * (y as f64 + 0.5) / h as f64;
            for (o, &env) in row.iter_mut().zip(env_row) {
                let db = db_per_neper * detmath::ln_fast((env as f64).max(1e-6)) + row_db;
                // Round half up; the cast truncates the non-negative clamped value.
                *o = ((db - self.floor_db) * scale + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
        out
    }
}

/// `floor(v)` for |v| < 2^62 without a libm call (the cast truncates toward zero).
fn floor_fast(v: f64) -> f64 {
    let t = v as i64 as f64;
    if t > v {
        t - 1.0
    } else {
        t
    }
}

/// Normalised (sum 1) Gaussian kernel of radius `ceil(3 sigma)`.
fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let r = (3.0 * sigma).ceil().max(1.0) as i64;
    let raw: Vec<f64> = (-r..=r)
        .map(|i| {
            let t = i as f64 / sigma;
            detmath::exp(-0.5 * t * t)
        })
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|&v| (v / total) as f32).collect()
}

/// Convolves a row-major field with `kx` along rows and `ky` along columns (edges clamped).
fn convolve_separable(src: &[f32], w: usize, h: usize, kx: &[f32], ky: &[f32]) -> Vec<f32> {
    let rx = (kx.len() / 2) as isize;
    let ry = (ky.len() / 2) as isize;
    let mut tmp = vec![0f32; w * h];
    let mut padded = vec![0f32; w + kx.len() - 1];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for (i, p) in padded.iter_mut().enumerate() {
            *p = row[(i as isize - rx).clamp(0, w as isize - 1) as usize];
        }
        let out = &mut tmp[y * w..(y + 1) * w];
        for (j, &k) in kx.iter().enumerate() {
            for (o, &v) in out.iter_mut().zip(&padded[j..j + w]) {
                *o += k * v;
            }
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for (j, &k) in ky.iter().enumerate() {
            let ys = (y as isize + j as isize - ry).clamp(0, h as isize - 1) as usize;
            let src_row = &tmp[ys * w..(ys + 1) * w];
            for (o, &v) in out[y * w..(y + 1) * w].iter_mut().zip(src_row) {
                *o += k * v;
            }
        }
    }
    out
}

impl Bone {
    /// A curved bone surface spanning roughly `lo..hi` (pixel columns, may extend past edges).
    fn sample(
        rng: &mut ChaCha8Rng,
        width: usize,
        height: usize,
        lo: f64,
        hi: f64,
        bone_amp: f64,
    ) -> Bone {
        let (w, h) = (width as f64, height as f64);
        let s = h / 384.0;
        let x0 = lo.floor().max(0.0) as usize;
        let x1 = (hi.ceil().max(0.0) as usize).min(width);
        let thickness = uni(rng, 10.0, 20.0) * s;
        let xc = uni(rng, lo.max(0.0), hi.min(w));
        let half = ((hi - lo) / 2.0).max(1.0);
        // Sag: depth change at `half` from the apex; negative = dome (humeral/femoral head).
        let sag = uni(rng, -0.3, 0.25) * h;
        let tilt = uni(rng, -0.25, 0.25);
        let depth = uni(rng, 0.3, 0.7) * h;
        let wobble_amp = uni(rng, 0.0, 0.015) * h;
        let wobble = wavy_curve(rng, width, 0.0, 0.0, wobble_amp);
        let mut surface: Vec<f64> = (x0..x1)
            .map(|x| {
                let dx = x as f64 + 0.5 - xc;
                let u = dx / half;
                depth + sag * u * u + tilt * dx + wobble[x]
            })
            .collect();
        // Ends inside the image curl down (rounded bone ends).
        for (end, inside) in [(lo, lo > 0.0), (hi, hi < w)] {
            if !inside {
                continue;
            }
            let len = uni(rng, 15.0, 40.0) * s;
            let drop = len * uni(rng, 0.4, 1.2);
            for (x, y) in (x0..x1).zip(surface.iter_mut()) {
                let d = ((x as f64 + 0.5 - end).abs() / len).min(1.0);
                *y += drop * (1.0 - d) * (1.0 - d);
            }
        }
        fit_into(&mut surface, depth, 0.15 * h, h - 0.1 * h - thickness);
        let ramp = uni(rng, 6.0, 20.0) * s;
        let taper = (x0..x1)
            .map(|x| {
                let xf = x as f64 + 0.5;
                smoothstep((xf - lo) / ramp) * smoothstep((hi - xf) / ramp)
            })
            .collect();
        Bone {
            x0,
            x1,
            surface,
            taper,
            thickness,
            amp: bone_amp * uni(rng, 0.9, 1.1),
            falloff: uni(rng, 1.6, 2.4),
            coherent: uni(rng, 0.4, 0.7),
            shadow: uni(rng, 0.02, 0.08),
        }
    }
}

/// Scales a curve's deviations from `centre` and shifts it so it lies within `top..=bottom`.
fn fit_into(curve: &mut [f64], centre: f64, top: f64, bottom: f64) {
    let lo = curve.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = curve.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi > lo && hi - lo > bottom - top {
        let k = (bottom - top) / (hi - lo);
        curve
            .iter_mut()
            .for_each(|y| *y = centre + k * (*y - centre));
    }
    let lo = curve.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = curve.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let shift = if lo < top {
        top - lo
    } else if hi > bottom {
        bottom - hi
    } else {
        0.0
    };
    curve.iter_mut().for_each(|y| *y += shift);
}

impl Bursa {
    /// A lens-shaped fluid band a little above `bone`, over part of its extent.
    fn sample(rng: &mut ChaCha8Rng, width: usize, height: usize, bone: &Bone) -> Bursa {
        let s = height as f64 / 384.0;
        let span = (bone.x1 - bone.x0) as f64;
        let len = span * uni(rng, 0.3, 0.7);
        let start = bone.x0 as f64 + uni(rng, 0.0, (span - len).max(0.0));
        let thick = uni(rng, 5.0, 12.0) * s;
        let gap = uni(rng, 10.0, 35.0) * s;
        let mut top = vec![0.0; width];
        let mut bottom = vec![0.0; width];
        for x in bone.x0..bone.x1 {
            let u = (x as f64 + 0.5 - start) / len * 2.0 - 1.0;
            if u.abs() >= 1.0 {
                continue;
            }
            let t = thick * (1.0 - u * u).sqrt();
            let b = bone.surface[x - bone.x0] - gap;
            top[x] = (b - t).max(1.0);
            bottom[x] = b.max(1.0);
        }
        Bursa {
            top,
            bottom,
            level: uni(rng, 0.03, 0.1),
            wall: uni(rng, 1.5, 3.0),
        }
    }
}
