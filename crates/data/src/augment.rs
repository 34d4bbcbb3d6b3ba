//! Training augmentation (SPEC §3): horizontal/vertical flip, translation up to 20%, rotation
//! within ±90° and random resized crop (area 0.8–1.0), each with p = 0.5, composed into one
//! affine warp applied by inverse mapping at the original size: bilinear for the image, nearest
//! for the label mask, pixels from outside the image are 0.
//!
//! Forward order (source → output): crop-and-resize, flips, rotation about the image centre
//! (counter-clockwise as displayed for a positive angle), translation.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::detmath;
use crate::detmath::splitmix64;

/// Probability of each augmentation.
const P: f64 = 0.5;
/// Largest translation as a fraction of the image side.
const MAX_TRANSLATE: f64 = 0.2;
/// Largest rotation in degrees.
const MAX_ROTATE_DEG: f64 = 90.0;
/// Smallest crop area as a fraction of the image.
const MIN_CROP_AREA: f64 = 0.8;

/// A crop window as fractions of the image (`x0 + w <= 1`, `y0 + h <= 1`), resized to the
/// full image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crop {
    /// Left edge, fraction of the width.
    pub x0: f64,
    /// Top edge, fraction of the height.
    pub y0: f64,
    /// Width, fraction of the width.
    pub w: f64,
    /// Height, fraction of the height.
    pub h: f64,
}

/// One draw of the augmentation parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Mirror left-right.
    pub hflip: bool,
    /// Mirror top-bottom.
    pub vflip: bool,
    /// Shift (x, y) as fractions of (width, height).
    pub translate: (f64, f64),
    /// Rotation in degrees, counter-clockwise as displayed.
    pub rotate_deg: f64,
    /// Random resized crop, if drawn.
    pub crop: Option<Crop>,
}

impl AugmentParams {
    /// No change.
    pub fn identity() -> AugmentParams {
        AugmentParams {
            hflip: false,
            vflip: false,
            translate: (0.0, 0.0),
            rotate_deg: 0.0,
            crop: None,
        }
    }

    /// Whether these parameters leave every image unchanged.
    pub fn is_identity(&self) -> bool {
        *self == AugmentParams::identity()
    }

    /// Draws parameters: each augmentation independently with p = 0.5. The crop's area is
    /// uniform in 0.8–1.0 and its aspect (relative to the image's) log-uniform in 3/4–4/3.
    pub fn sample<R: Rng + ?Sized>(rng: &mut R) -> AugmentParams {
        let hflip = rng.random_bool(P);
        let vflip = rng.random_bool(P);
        let translate = if rng.random_bool(P) {
            (
                rng.random_range(-MAX_TRANSLATE..=MAX_TRANSLATE),
                rng.random_range(-MAX_TRANSLATE..=MAX_TRANSLATE),
            )
        } else {
            (0.0, 0.0)
        };
        let rotate_deg = if rng.random_bool(P) {
            rng.random_range(-MAX_ROTATE_DEG..=MAX_ROTATE_DEG)
        } else {
            0.0
        };
        let crop = rng.random_bool(P).then(|| {
            let area = rng.random_range(MIN_CROP_AREA..=1.0);
            let log_ratio = rng.random_range(detmath::ln(3.0 / 4.0)..=detmath::ln(4.0 / 3.0));
            let ratio = detmath::exp(log_ratio);
            let w = (area * ratio).sqrt().min(1.0);
            let h = (area / ratio).sqrt().min(1.0);
            Crop {
                x0: rng.random_range(0.0..=1.0 - w),
                y0: rng.random_range(0.0..=1.0 - h),
                w,
                h,
            }
        });
        AugmentParams {
            hflip,
            vflip,
            translate,
            rotate_deg,
            crop,
        }
    }

    /// Parameters of view `view_index` of image `image_index`: identity for view 0, otherwise
    /// drawn from a ChaCha8 generator seeded with [`view_seed`].
    pub fn for_view(base_seed: u64, image_index: u64, view_index: u64) -> AugmentParams {
        if view_index == 0 {
            return AugmentParams::identity();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(view_seed(base_seed, image_index, view_index));
        AugmentParams::sample(&mut rng)
    }

    /// Forward affine map (output = A * source + t) in pixel-edge coordinates of a `w x h`
    /// image, as `[a00, a01, t0, a10, a11, t1]`.
    fn forward(&self, h: usize, w: usize) -> [f64; 6] {
        let (wf, hf) = (w as f64, h as f64);
        // Start with the crop: source window -> full image.
        let mut m = match self.crop {
            Some(c) => [
                1.0 / c.w,
                0.0,
                -c.x0 * wf / c.w,
                0.0,
                1.0 / c.h,
                -c.y0 * hf / c.h,
            ],
            None => [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        };
        if self.hflip {
            m = then(m, [-1.0, 0.0, wf, 0.0, 1.0, 0.0]);
        }
        if self.vflip {
            m = then(m, [1.0, 0.0, 0.0, 0.0, -1.0, hf]);
        }
        if self.rotate_deg != 0.0 {
            let t = self.rotate_deg.to_radians();
            let (s, c) = (detmath::sin(t), detmath::cos(t));
            let (cx, cy) = (wf / 2.0, hf / 2.0);
            // y points down, so counter-clockwise on screen is x' = c dx + s dy, y' = -s dx + c dy.
            m = then(m, [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy]);
        }
        if self.translate != (0.0, 0.0) {
            m = then(
                m,
                [
                    1.0,
                    0.0,
                    self.translate.0 * wf,
                    0.0,
                    1.0,
                    self.translate.1 * hf,
                ],
            );
        }
        m
    }
}

/// Composition "first `a`, then `b`" of two affine maps.
fn then(a: [f64; 6], b: [f64; 6]) -> [f64; 6] {
    [
        b[0] * a[0] + b[1] * a[3],
        b[0] * a[1] + b[1] * a[4],
        b[0] * a[2] + b[1] * a[5] + b[2],
        b[3] * a[0] + b[4] * a[3],
        b[3] * a[1] + b[4] * a[4],
        b[3] * a[2] + b[4] * a[5] + b[5],
    ]
}

/// Inverse of an invertible affine map.
fn invert(m: [f64; 6]) -> [f64; 6] {
    let det = m[0] * m[4] - m[1] * m[3];
    let (i00, i01, i10, i11) = (m[4] / det, -m[1] / det, -m[3] / det, m[0] / det);
    [
        i00,
        i01,
        -(i00 * m[2] + i01 * m[5]),
        i10,
        i11,
        -(i10 * m[2] + i11 * m[5]),
    ]
}

/// Seed of augmentation view `view_index` of image `image_index` (a fixed 64-bit hash), so
/// "view k of image i" is reproducible and can key an embedding cache.
pub fn view_seed(base_seed: u64, image_index: u64, view_index: u64) -> u64 {
    let a = splitmix64(base_seed ^ 0xa076_1d64_78bd_642f);
    let b = splitmix64(a ^ image_index);
    splitmix64(b ^ view_index.wrapping_mul(0xe703_7ed1_a0b4_28db))
}

/// Warps an RGB image (`h * w * 3`, HWC) bilinearly and its label mask (`h * w`) by nearest
/// neighbour with `params`, keeping the size; an empty `mask` stays empty.
///
/// # Panics
/// If the buffer lengths do not match `h` and `w`.
pub fn apply(
    params: &AugmentParams,
    rgb: &[u8],
    mask: &[u8],
    h: usize,
    w: usize,
) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(rgb.len(), h * w * 3, "rgb buffer is not {h}x{w}x3");
    assert!(
        mask.is_empty() || mask.len() == h * w,
        "mask buffer is not {h}x{w}"
    );
    if params.is_identity() {
        return (rgb.to_vec(), mask.to_vec());
    }
    let inv = invert(params.forward(h, w));
    let mut out_rgb = vec![0u8; h * w * 3];
    let mut out_mask = vec![0u8; mask.len()];
    let (wi, hi) = (w as i64, h as i64);
    for v in 0..h {
        let yc = v as f64 + 0.5;
        for u in 0..w {
            let xc = u as f64 + 0.5;
            // Source position in pixel-index coordinates (pixel centres at integers).
            let sx = inv[0] * xc + inv[1] * yc + inv[2] - 0.5;
            let sy = inv[3] * xc + inv[4] * yc + inv[5] - 0.5;
            let o = v * w + u;
            if !mask.is_empty() {
                let (nx, ny) = ((sx + 0.5).floor() as i64, (sy + 0.5).floor() as i64);
                if (0..wi).contains(&nx) && (0..hi).contains(&ny) {
                    out_mask[o] = mask[ny as usize * w + nx as usize];
                }
            }
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            if x0 < -1 || y0 < -1 || x0 >= wi || y0 >= hi {
                continue;
            }
            let mut acc = [0f64; 3];
            for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
                let yy = y0 + dy;
                if wy == 0.0 || !(0..hi).contains(&yy) {
                    continue;
                }
                for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
                    let xx = x0 + dx;
                    if wx == 0.0 || !(0..wi).contains(&xx) {
                        continue;
                    }
                    let p = (yy as usize * w + xx as usize) * 3;
                    let wt = wx * wy;
                    for (a, &s) in acc.iter_mut().zip(&rgb[p..p + 3]) {
                        *a += wt * s as f64;
                    }
                }
            }
            for (dst, a) in out_rgb[o * 3..o * 3 + 3].iter_mut().zip(acc) {
                *dst = a.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    (out_rgb, out_mask)
}
