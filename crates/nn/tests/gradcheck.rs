//! Finite-difference gradient checks (f64, central differences) of every op, layer and loss.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::VarBuilder;
use sam2rad_nn::{loss, ops, ConvTranspose2x2, LayerNorm, LayerNorm2d, Linear};

/// Half-width of the central difference.
const FD_EPS: f64 = 1e-6;
/// Relative tolerance between analytic and numeric gradients.
const REL_TOL: f64 = 1e-5;
/// Absolute floor of the tolerance (rounding noise of the finite difference).
const ABS_TOL: f64 = 1e-8;

/// Tiny deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform(f64::MIN_POSITIVE, 1.0);
        let u2 = self.uniform(0.0, 1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn tensor_normal(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn tensor_uniform(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.uniform(lo, hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// 0/1 mask.
    fn tensor_mask(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| f64::from(u8::from(self.uniform(0.0, 1.0) < 0.5)))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// Scalar objective `Σ f(inputs)·r` with a fixed random projection `r`, evaluated in f64.
fn objective(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], r: &Tensor) -> f64 {
    f(inputs)
        .unwrap()
        .mul(r)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Checks candle's backprop gradient of `Σ f(inputs)·r` wrt every input against central
/// differences; returns the largest relative error seen.
fn check_grads(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors).unwrap();
    let r = Rng(0xC0FFEE).tensor_normal(y.dims());
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();

    let mut worst = 0f64;
    for (k, var) in vars.iter().enumerate() {
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut perturbed: Vec<Tensor> = tensors.iter().map(|t| t.detach()).collect();
                perturbed[k] = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
                objective(&f, &perturbed, &r)
            };
            let numeric = (eval(FD_EPS) - eval(-FD_EPS)) / (2.0 * FD_EPS);
            let a = analytic[i];
            let err = (a - numeric).abs();
            let scale = a.abs().max(numeric.abs());
            assert!(
                err <= REL_TOL * scale + ABS_TOL,
                "{name}: input {k} element {i}: analytic {a} vs numeric {numeric}"
            );
            if scale > 0.0 {
                worst = worst.max(err / scale);
            }
        }
    }
    worst
}

#[test]
fn grad_softmax_last_dim() {
    let mut rng = Rng(1);
    let x = rng.tensor_normal(&[2, 3, 5]).affine(2.0, 0.0).unwrap();
    check_grads("softmax", &[x], |t| ops::softmax_last_dim(&t[0]));
}

#[test]
fn grad_layer_norm() {
    let mut rng = Rng(2);
    let x = rng.tensor_normal(&[3, 7]);
    let w = rng.tensor_normal(&[7]);
    let b = rng.tensor_normal(&[7]);
    check_grads("layer_norm", &[x, w, b], |t| {
        ops::layer_norm(&t[0], &t[1], &t[2], 1e-6)
    });
}

#[test]
fn grad_layer_norm_module() {
    let mut rng = Rng(3);
    let x = rng.tensor_normal(&[2, 2, 6]);
    let w = rng.tensor_normal(&[6]);
    let b = rng.tensor_normal(&[6]);
    check_grads("LayerNorm", &[x, w, b], |t| {
        let ts = HashMap::from([
            ("weight".to_string(), t[1].clone()),
            ("bias".to_string(), t[2].clone()),
        ]);
        let vb = VarBuilder::from_tensors(ts, DType::F64, &Device::Cpu);
        LayerNorm::new(6, 1e-5, vb)?.forward(&t[0])
    });
}

#[test]
fn grad_parameter_broadcasts() {
    let mut rng = Rng(21);
    let x = rng.tensor_normal(&[2, 3, 4]);
    let p = rng.tensor_normal(&[4]);
    check_grads("add_last", &[x.clone(), p.clone()], |t| {
        ops::add_last(&t[0], &t[1])
    });
    check_grads("mul_last", &[x.clone(), p.clone()], |t| {
        ops::mul_last(&t[0], &t[1])
    });
    let c = rng.tensor_normal(&[3]);
    let x4 = rng.tensor_normal(&[2, 3, 2, 5]);
    check_grads("add_channels", &[x4.clone(), c.clone()], |t| {
        ops::add_channels(&t[0], &t[1])
    });
    check_grads("mul_channels", &[x4.clone(), c.clone()], |t| {
        ops::mul_channels(&t[0], &t[1])
    });
    // The tracked (tiled) path computes the same values as a plain broadcast.
    let pv = Var::from_tensor(&p).unwrap();
    let tiled = ops::mul_last(&x, pv.as_tensor()).unwrap();
    let plain = x.broadcast_mul(&p).unwrap();
    let diff = (tiled - plain).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
    let cv = Var::from_tensor(&c).unwrap();
    let tiled = ops::add_channels(&x4, cv.as_tensor()).unwrap();
    let plain = x4.broadcast_add(&c.reshape((1, 3, 1, 1)).unwrap()).unwrap();
    let diff = (tiled - plain).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
}

#[test]
fn grad_linear() {
    let mut rng = Rng(22);
    let x = rng.tensor_normal(&[2, 3, 5]);
    let w = rng.tensor_normal(&[4, 5]);
    let b = rng.tensor_normal(&[4]);
    check_grads("Linear", &[x, w, b], |t| {
        Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0])
    });
}

#[test]
fn grad_layer_norm2d() {
    let mut rng = Rng(4);
    let x = rng.tensor_normal(&[2, 3, 3, 4]);
    let w = rng.tensor_normal(&[3]);
    let b = rng.tensor_normal(&[3]);
    check_grads("layer_norm2d", &[x.clone(), w.clone(), b.clone()], |t| {
        ops::layer_norm2d(&t[0], &t[1], &t[2], 1e-6)
    });
    check_grads("LayerNorm2d", &[x, w, b], |t| {
        let ts = HashMap::from([
            ("weight".to_string(), t[1].clone()),
            ("bias".to_string(), t[2].clone()),
        ]);
        let vb = VarBuilder::from_tensors(ts, DType::F64, &Device::Cpu);
        LayerNorm2d::new(3, 1e-6, vb)?.forward(&t[0])
    });
}

#[test]
fn grad_gelu() {
    let mut rng = Rng(5);
    let x = rng.tensor_uniform(&[40], -5.0, 5.0);
    check_grads("gelu", &[x], |t| ops::gelu(&t[0]));
}

#[test]
fn grad_sigmoid() {
    let mut rng = Rng(6);
    let x = rng.tensor_uniform(&[30], -8.0, 8.0);
    check_grads("sigmoid", &[x], |t| ops::sigmoid(&t[0]));
}

#[test]
fn grad_resize_bilinear() {
    let mut rng = Rng(7);
    let cases: [(&[usize], (usize, usize)); 4] = [
        (&[1, 2, 3, 3], (12, 12)), // ×4 upsample
        (&[2, 1, 8, 9], (3, 4)),   // downsample
        (&[1, 2, 5, 7], (7, 3)),   // non-integer factors: 5→7 and 7→3
        (&[1, 1, 4, 4], (4, 6)),   // one axis unchanged
    ];
    for (shape, (h, w)) in cases {
        let x = rng.tensor_normal(shape);
        let name = format!("resize_bilinear {shape:?} -> {h}x{w}");
        check_grads(&name, &[x], |t| ops::resize_bilinear(&t[0], h, w));
    }
}

#[test]
fn grad_resize_nearest() {
    let mut rng = Rng(8);
    let cases: [(&[usize], (usize, usize)); 3] = [
        (&[1, 2, 3, 2], (5, 7)),
        (&[2, 1, 7, 6], (3, 4)),
        (&[1, 1, 2, 3], (4, 6)),
    ];
    for (shape, (h, w)) in cases {
        let x = rng.tensor_normal(shape);
        let name = format!("resize_nearest {shape:?} -> {h}x{w}");
        check_grads(&name, &[x], |t| ops::resize_nearest(&t[0], h, w));
    }
}

#[test]
fn resize_nearest_gradient_accumulates() {
    let x = Var::from_tensor(&Rng(9).tensor_normal(&[1, 1, 2, 2])).unwrap();
    let y = ops::resize_nearest(x.as_tensor(), 4, 4).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g: Vec<f64> = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(g, vec![4.0; 4]);
}

#[test]
fn grad_max_pool2d() {
    let mut rng = Rng(10);
    // 5×7 with k = 2 also exercises the floor-mode trimming of the last row/column.
    let x = rng.tensor_normal(&[2, 2, 5, 7]);
    check_grads("max_pool2d", &[x], |t| ops::max_pool2d(&t[0], 2));
    let x = rng.tensor_normal(&[1, 3, 6, 6]);
    check_grads("max_pool2d k3", &[x], |t| ops::max_pool2d(&t[0], 3));
}

/// Builds a `ConvTranspose2x2` from explicit weight and bias tensors.
fn conv_t(w: &Tensor, b: &Tensor) -> Result<ConvTranspose2x2> {
    let (inp, out, _, _) = w.dims4()?;
    let ts = HashMap::from([
        ("weight".to_string(), w.clone()),
        ("bias".to_string(), b.clone()),
    ]);
    ConvTranspose2x2::new(
        inp,
        out,
        VarBuilder::from_tensors(ts, w.dtype(), &Device::Cpu),
    )
}

#[test]
fn conv_transpose2x2_matches_candle_conv_transpose2d() {
    let mut rng = Rng(11);
    let x = rng.tensor_normal(&[2, 5, 3, 4]);
    let w = rng.tensor_normal(&[5, 6, 2, 2]);
    let b = rng.tensor_normal(&[6]);
    for dt in [DType::F64, DType::F32] {
        let (x, w, b) = (
            x.to_dtype(dt).unwrap(),
            w.to_dtype(dt).unwrap(),
            b.to_dtype(dt).unwrap(),
        );
        let ours = conv_t(&w, &b).unwrap().forward(&x).unwrap();
        let reference = x
            .conv_transpose2d(&w, 0, 0, 2, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), &[2, 6, 6, 8]);
        let diff = (ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
        assert!(diff < tol, "{dt:?}: max |diff| {diff}");
    }
}

#[test]
fn grad_conv_transpose2x2() {
    let mut rng = Rng(12);
    let x = rng.tensor_normal(&[2, 3, 2, 3]);
    let w = rng.tensor_normal(&[3, 2, 2, 2]);
    let b = rng.tensor_normal(&[2]);
    check_grads("ConvTranspose2x2", &[x, w, b], |t| {
        conv_t(&t[1], &t[2])?.forward(&t[0])
    });
}

#[test]
fn grad_bce_with_logits() {
    let mut rng = Rng(13);
    let x = rng.tensor_uniform(&[4, 6], -6.0, 6.0);
    let y = rng.tensor_uniform(&[4, 6], 0.0, 1.0);
    check_grads("bce_with_logits", &[x, y], |t| {
        loss::bce_with_logits(&t[0], &t[1])
    });
}

#[test]
fn grad_mean_or_zero() {
    let x = Rng(14).tensor_normal(&[3, 4]);
    check_grads("mean_or_zero", &[x], |t| loss::mean_or_zero(&t[0]));
}

#[test]
fn grad_sigmoid_focal_loss() {
    let mut rng = Rng(15);
    let x = rng.tensor_uniform(&[3, 8], -6.0, 6.0);
    let hard = rng.tensor_mask(&[3, 8]);
    let soft = rng.tensor_uniform(&[3, 8], 0.0, 1.0);
    for (gamma, alpha) in [(2.0, 0.25), (0.5, 0.75), (0.0, -1.0), (1.5, -1.0)] {
        let name = format!("focal gamma={gamma} alpha={alpha}");
        check_grads(&name, std::slice::from_ref(&x), |t| {
            loss::sigmoid_focal_loss(&t[0], &hard, gamma, alpha)
        });
        check_grads(&name, &[x.clone(), soft.clone()], |t| {
            loss::sigmoid_focal_loss(&t[0], &t[1], gamma, alpha)
        });
    }
}

#[test]
fn grad_soft_dice_loss() {
    let mut rng = Rng(16);
    let x = rng.tensor_uniform(&[3, 1, 4, 5], -4.0, 4.0);
    let y = rng.tensor_mask(&[3, 1, 4, 5]);
    check_grads("soft_dice_loss", std::slice::from_ref(&x), |t| {
        loss::soft_dice_loss(&t[0], &y, 1.0)
    });
    let soft = rng.tensor_uniform(&[3, 1, 4, 5], 0.0, 1.0);
    check_grads("soft_dice_loss soft targets", &[x, soft], |t| {
        loss::soft_dice_loss(&t[0], &t[1], 0.0)
    });
}

#[test]
fn grad_l1_loss() {
    let mut rng = Rng(17);
    let a = rng.tensor_normal(&[5, 4]);
    // b = a + d with |d| ≥ 0.1, so no element sits near the kink of |·|.
    let d: Vec<f64> = (0..20)
        .map(|_| {
            let m = rng.uniform(0.1, 1.0);
            if rng.uniform(0.0, 1.0) < 0.5 {
                -m
            } else {
                m
            }
        })
        .collect();
    let b = (&a + Tensor::from_vec(d, (5, 4), &Device::Cpu).unwrap()).unwrap();
    check_grads("l1_loss", &[a, b], |t| loss::l1_loss(&t[0], &t[1]));
}

/// `n` random valid xyxy boxes in [0, 10]².
fn random_boxes(rng: &mut Rng, n: usize) -> Tensor {
    let mut v = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let x1 = rng.uniform(0.0, 6.0);
        let y1 = rng.uniform(0.0, 6.0);
        v.extend([
            x1,
            y1,
            x1 + rng.uniform(0.5, 4.0),
            y1 + rng.uniform(0.5, 4.0),
        ]);
    }
    Tensor::from_vec(v, (n, 4), &Device::Cpu).unwrap()
}

#[test]
fn grad_giou_loss() {
    let mut rng = Rng(18);
    // 16 random pairs: a mix of overlapping, nested and disjoint boxes.
    let p = random_boxes(&mut rng, 16);
    let t = random_boxes(&mut rng, 16);
    check_grads("giou_loss", &[p, t], |ts| loss::giou_loss(&ts[0], &ts[1]));
}
