//! Forward values against hand-computed PyTorch numbers, stability at extreme logits, empty inputs.

use candle_core::{DType, Device, Tensor, Var};
use sam2rad_nn::{loss, ops};

fn t(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn vec_f64(x: &Tensor) -> Vec<f64> {
    x.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

fn assert_all_finite(x: &Tensor, what: &str) {
    for (i, v) in vec_f64(x).iter().enumerate() {
        assert!(v.is_finite(), "{what}[{i}] = {v}");
    }
}

/// PyTorch's `align_corners=False` bilinear source index and weights for one output position,
/// straight from `area_pixel_compute_source_index` (clamped at 0) in f64.
fn torch_linear(in_size: usize, out_size: usize, o: usize) -> (usize, usize, f64) {
    let scale = in_size as f64 / out_size as f64;
    let src = (scale * (o as f64 + 0.5) - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(in_size - 1);
    let i1 = if i0 + 1 < in_size { i0 + 1 } else { i0 };
    (i0, i1, (src - i0 as f64).clamp(0.0, 1.0))
}

/// Reference 2-D bilinear resize of one H×W plane.
fn reference_bilinear(x: &[f64], ih: usize, iw: usize, h: usize, w: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(h * w);
    for oy in 0..h {
        let (y0, y1, ly) = torch_linear(ih, h, oy);
        for ox in 0..w {
            let (x0, x1, lx) = torch_linear(iw, w, ox);
            let at = |y: usize, xx: usize| x[y * iw + xx];
            out.push(
                (1.0 - ly) * ((1.0 - lx) * at(y0, x0) + lx * at(y0, x1))
                    + ly * ((1.0 - lx) * at(y1, x0) + lx * at(y1, x1)),
            );
        }
    }
    out
}

#[test]
fn bilinear_matches_pytorch_hand_values() {
    // F.interpolate(torch.tensor([[[[1., 2.]]]]), size=(1, 4), mode="bilinear") = [1, 1.25, 1.75, 2]
    let y = ops::resize_bilinear(&t(&[1.0, 2.0], &[1, 1, 1, 2]), 1, 4).unwrap();
    assert_close(&vec_f64(&y), &[1.0, 1.25, 1.75, 2.0], 1e-6, "2->4");
    // Downsample 4 -> 2: sources 0.5 and 2.5.
    let y = ops::resize_bilinear(&t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 1, 4]), 1, 2).unwrap();
    assert_close(&vec_f64(&y), &[1.5, 3.5], 1e-6, "4->2");
    // Non-integer 3 -> 5 (scale 0.6): sources 0 (clamped), 0.4, 1.0, 1.6, 2.2 (edge-clamped).
    let y = ops::resize_bilinear(&t(&[0.0, 10.0, 20.0], &[1, 1, 3, 1]), 5, 1).unwrap();
    assert_close(&vec_f64(&y), &[0.0, 4.0, 10.0, 16.0, 20.0], 1e-5, "3->5");
    // 2×2 -> 4×4 of [[1, 2], [3, 4]]: separable 1, 1.25, 1.75, 2 weights on both axes.
    let y = ops::resize_bilinear(&t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2]), 4, 4).unwrap();
    #[rustfmt::skip]
    let want = [
        1.0, 1.25, 1.75, 2.0,
        1.5, 1.75, 2.25, 2.5,
        2.5, 2.75, 3.25, 3.5,
        3.0, 3.25, 3.75, 4.0,
    ];
    assert_close(&vec_f64(&y), &want, 1e-6, "2x2->4x4");
}

#[test]
fn bilinear_matches_reference_formula() {
    let cases = [
        (5, 7, 7, 3),
        (3, 3, 12, 12),
        (8, 9, 3, 4),
        (7, 5, 16, 11),
        (6, 6, 6, 6),
    ];
    for (ih, iw, h, w) in cases {
        let x: Vec<f64> = (0..ih * iw).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
        let want = reference_bilinear(&x, ih, iw, h, w);
        for dt in [DType::F32, DType::F64] {
            let input = t(&x, &[1, 1, ih, iw]).to_dtype(dt).unwrap();
            let y = ops::resize_bilinear(&input, h, w).unwrap();
            assert_eq!(y.dims(), &[1, 1, h, w]);
            let what = format!("{ih}x{iw}->{h}x{w} {dt:?}");
            assert_close(&vec_f64(&y), &want, 1e-5, &what);
        }
    }
}

#[test]
fn nearest_matches_pytorch_indices() {
    // PyTorch "nearest": src = floor(dst · in/out).
    let x = t(&[0.0, 1.0, 2.0], &[1, 1, 1, 3]);
    let y = ops::resize_nearest(&x, 1, 5).unwrap();
    assert_close(&vec_f64(&y), &[0.0, 0.0, 1.0, 1.0, 2.0], 0.0, "3->5");
    let x = t(&[0.0, 1.0, 2.0, 3.0, 4.0], &[1, 1, 5, 1]);
    let y = ops::resize_nearest(&x, 3, 1).unwrap();
    assert_close(&vec_f64(&y), &[0.0, 1.0, 3.0], 0.0, "5->3");
    let x = t(&[7.0, 8.0], &[1, 1, 1, 2]);
    let y = ops::resize_nearest(&x, 1, 4).unwrap();
    assert_close(&vec_f64(&y), &[7.0, 7.0, 8.0, 8.0], 0.0, "2->4");
}

#[test]
fn max_pool2d_values() {
    #[rustfmt::skip]
    let x = t(&[
        1.0, 5.0, 2.0, 0.0, 9.0,
        3.0, 4.0, 8.0, 1.0, 9.0,
        -1.0, -2.0, -3.0, -4.0, 9.0,
        -5.0, -0.5, -6.0, -7.0, 9.0,
        9.0, 9.0, 9.0, 9.0, 9.0,
    ], &[1, 1, 5, 5]);
    let y = ops::max_pool2d(&x, 2).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 2]);
    assert_close(&vec_f64(&y), &[5.0, 8.0, -0.5, -3.0], 0.0, "max_pool2d");
}

#[test]
fn softmax_layer_norm_gelu_values() {
    let y = ops::softmax_last_dim(&t(&[0.0, 2f64.ln(), 1e4], &[1, 3])).unwrap();
    assert_close(&vec_f64(&y), &[0.0, 0.0, 1.0], 1e-12, "softmax extreme");
    let y = ops::softmax_last_dim(&t(&[0.0, 2f64.ln()], &[2])).unwrap();
    assert_close(&vec_f64(&y), &[1.0 / 3.0, 2.0 / 3.0], 1e-12, "softmax");
    // [1, 3]: mean 2, biased var 1 -> normalised [-1, 1] / sqrt(1 + eps).
    let y = ops::layer_norm(
        &t(&[1.0, 3.0], &[1, 2]),
        &t(&[2.0, 1.0], &[2]),
        &t(&[0.5, 0.0], &[2]),
        0.0,
    )
    .unwrap();
    assert_close(&vec_f64(&y), &[-1.5, 1.0], 1e-12, "layer_norm");
    // gelu(1) = 0.5·(1 + erf(1/√2)) = 0.8413447460685429
    let y = ops::gelu(&t(&[1.0, 0.0, -1.0], &[3])).unwrap();
    assert_close(
        &vec_f64(&y),
        &[0.841_344_746_068_542_9, 0.0, -0.158_655_253_931_457_1],
        1e-12,
        "gelu",
    );
}

#[test]
fn bce_values() {
    let ln2 = std::f64::consts::LN_2;
    let x = t(&[0.0, 0.0, 0.0, 2.0, 2.0, -3.0], &[6]);
    let y = t(&[0.0, 1.0, 0.3, 1.0, 0.0, 1.0], &[6]);
    let want = [
        ln2,
        ln2,
        ln2,
        (1.0 + (-2f64).exp()).ln(),
        (1.0 + 2f64.exp()).ln(),
        (1.0 + 3f64.exp()).ln(),
    ];
    assert_close(
        &vec_f64(&loss::bce_with_logits(&x, &y).unwrap()),
        &want,
        1e-12,
        "bce",
    );
    let m = loss::mean_or_zero(&loss::bce_with_logits(&x, &y).unwrap()).unwrap();
    assert_close(
        &vec_f64(&m),
        &[want.iter().sum::<f64>() / 6.0],
        1e-12,
        "bce mean",
    );
}

#[test]
fn focal_values() {
    let x = t(&[-3.0, -0.5, 0.0, 0.7, 2.5, 4.0], &[6]);
    let y = t(&[0.0, 1.0, 1.0, 0.0, 1.0, 0.4], &[6]);
    let bce = vec_f64(&loss::bce_with_logits(&x, &y).unwrap());
    // gamma = 0 and alpha < 0: plain BCE.
    let f = vec_f64(&loss::sigmoid_focal_loss(&x, &y, 0.0, -1.0).unwrap());
    assert_close(&f, &bce, 1e-15, "focal gamma 0");
    // torchvision formula computed naively (safe at these moderate logits).
    let (gamma, alpha) = (2.0, 0.25);
    let want: Vec<f64> = vec_f64(&x)
        .iter()
        .zip(vec_f64(&y))
        .zip(&bce)
        .map(|((&xi, yi), ce)| {
            let p = 1.0 / (1.0 + (-xi).exp());
            let p_t = p * yi + (1.0 - p) * (1.0 - yi);
            let alpha_t = alpha * yi + (1.0 - alpha) * (1.0 - yi);
            alpha_t * ce * (1.0 - p_t).powf(gamma)
        })
        .collect();
    let f = vec_f64(&loss::sigmoid_focal_loss(&x, &y, gamma, alpha).unwrap());
    assert_close(&f, &want, 1e-12, "focal gamma 2 alpha 0.25");
    // Hand value: x = 0, y = 1 -> 0.25 · 0.5² · ln 2.
    assert_close(
        &f[2..3],
        &[0.25 * 0.25 * std::f64::consts::LN_2],
        1e-12,
        "focal at 0",
    );
}

#[test]
fn dice_values() {
    // p = 0.5 on 4 pixels, 2 foreground: 1 - (2·1 + 1)/(2 + 2 + 1) = 0.4.
    let x = t(&[0.0; 8], &[2, 1, 2, 2]);
    let y = t(&[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[2, 1, 2, 2]);
    let d = loss::soft_dice_loss(&x, &y, 1.0).unwrap();
    assert_eq!(d.dims(), &[2]);
    // Second instance: empty target, p = 0.5: 1 - 1/(2 + 1).
    assert_close(&vec_f64(&d), &[0.4, 2.0 / 3.0], 1e-12, "dice");
    // Saturated logits equal to the mask give (almost) zero loss.
    let x = t(
        &[1e4, 1e4, -1e4, -1e4, -1e4, -1e4, -1e4, -1e4],
        &[2, 1, 2, 2],
    );
    let d = loss::soft_dice_loss(&x, &y, 1.0).unwrap();
    assert_close(&vec_f64(&d), &[0.0, 0.0], 1e-12, "dice perfect");
}

#[test]
fn l1_values() {
    let a = t(&[1.0, -2.0, 3.5], &[3]);
    let b = t(&[0.5, 2.0, 3.5], &[3]);
    assert_close(
        &vec_f64(&loss::l1_loss(&a, &b).unwrap()),
        &[0.5, 4.0, 0.0],
        0.0,
        "l1",
    );
}

#[test]
fn giou_values() {
    let p = t(
        &[
            1.0, 2.0, 4.0, 6.0, // identical
            0.0, 0.0, 1.0, 1.0, // disjoint
            0.0, 0.0, 2.0, 2.0, // partial overlap
            1.0, 1.0, 1.0, 1.0, // degenerate (point) inside the target
        ],
        &[4, 4],
    );
    let g = t(
        &[
            1.0, 2.0, 4.0, 6.0, //
            2.0, 0.0, 3.0, 1.0, //
            1.0, 1.0, 3.0, 3.0, //
            0.0, 0.0, 2.0, 2.0, //
        ],
        &[4, 4],
    );
    let l = vec_f64(&loss::giou_loss(&p, &g).unwrap());
    // identical: 0; disjoint: inter 0, union 2, hull 3 -> 1 + 1/3;
    // overlap: inter 1, union 7, hull 9 -> 1 - 1/7 + 2/9; point: inter 0, union = hull = 4 -> 1.
    let want = [0.0, 4.0 / 3.0, 1.0 - 1.0 / 7.0 + 2.0 / 9.0, 1.0];
    assert_close(&l, &want, 1e-6, "giou");
    assert!(l[1] > 1.0);
}

#[test]
fn giou_degenerate_boxes_finite() {
    for dt in [DType::F32, DType::F64] {
        let p = Var::from_tensor(
            &t(
                &[1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0],
                &[3, 4],
            )
            .to_dtype(dt)
            .unwrap(),
        )
        .unwrap();
        let g = t(
            &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 6.0, 6.0, 4.0, 4.0],
            &[3, 4],
        )
        .to_dtype(dt)
        .unwrap();
        let l = loss::giou_loss(p.as_tensor(), &g).unwrap();
        assert_all_finite(&l, "giou degenerate");
        let grads = l.sum_all().unwrap().backward().unwrap();
        assert_all_finite(grads.get(p.as_tensor()).unwrap(), "giou degenerate grad");
    }
}

/// Logits at ±1e4 and moderate values, against 0/1 targets.
const EXTREME: [f64; 8] = [-1e4, -1e4, -50.0, 0.0, 50.0, 1e4, 1e4, -1e4];
const EXTREME_Y: [f64; 8] = [0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.5];

#[test]
fn bce_stable_at_extreme_logits() {
    for dt in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&t(&EXTREME, &[8]).to_dtype(dt).unwrap()).unwrap();
        let y = t(&EXTREME_Y, &[8]).to_dtype(dt).unwrap();
        let l = loss::bce_with_logits(x.as_tensor(), &y).unwrap();
        let ln2 = std::f64::consts::LN_2;
        let want = [0.0, 1e4, 50.0, ln2, 50.0, 0.0, 1e4, 5e3];
        assert_close(&vec_f64(&l), &want, 1e-4, &format!("bce extreme {dt:?}"));
        let grads = l.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        // d/dx = σ(x) − y.
        let want_g = [0.0, -1.0, -1.0, 0.5, 1.0, 0.0, 1.0, -0.5];
        assert_close(
            &vec_f64(g),
            &want_g,
            1e-6,
            &format!("bce extreme grad {dt:?}"),
        );
    }
}

#[test]
fn focal_stable_at_extreme_logits() {
    for dt in [DType::F32, DType::F64] {
        for gamma in [0.0, 0.5, 2.0] {
            let x = Var::from_tensor(&t(&EXTREME, &[8]).to_dtype(dt).unwrap()).unwrap();
            let y = t(&EXTREME_Y, &[8]).to_dtype(dt).unwrap();
            let l = loss::sigmoid_focal_loss(x.as_tensor(), &y, gamma, 0.25).unwrap();
            let what = format!("focal extreme {dt:?} gamma {gamma}");
            assert_all_finite(&l, &what);
            let v = vec_f64(&l);
            // Confident and right: 0. Confident and wrong (y = 0, x = 1e4): α_t·ce = 0.75·1e4.
            assert!(v[0].abs() < 1e-6 && v[5].abs() < 1e-6, "{what}: {v:?}");
            assert!((v[6] - 0.75e4).abs() < 1e-2, "{what}: {v:?}");
            assert!((v[1] - 0.25e4).abs() < 1e-2, "{what}: {v:?}");
            let grads = l.sum_all().unwrap().backward().unwrap();
            assert_all_finite(grads.get(x.as_tensor()).unwrap(), &format!("{what} grad"));
        }
    }
}

#[test]
fn dice_stable_and_empty_masks() {
    for dt in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&t(&EXTREME, &[2, 1, 2, 2]).to_dtype(dt).unwrap()).unwrap();
        let y = t(&EXTREME_Y, &[2, 1, 2, 2]).to_dtype(dt).unwrap();
        for smooth in [0.0, 1.0] {
            let l = loss::soft_dice_loss(x.as_tensor(), &y, smooth).unwrap();
            assert_all_finite(&l, "dice extreme");
            let grads = l.sum_all().unwrap().backward().unwrap();
            assert_all_finite(grads.get(x.as_tensor()).unwrap(), "dice extreme grad");
        }
        // Empty target and empty prediction, with and without smoothing.
        let x = Var::from_tensor(
            &Tensor::full(-1e4, (3, 1, 4, 4), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        let y = Tensor::zeros((3, 1, 4, 4), dt, &Device::Cpu).unwrap();
        for (smooth, want) in [(1.0, 0.0), (0.0, 1.0)] {
            let l = loss::soft_dice_loss(x.as_tensor(), &y, smooth).unwrap();
            assert_close(
                &vec_f64(&l),
                &[want; 3],
                1e-6,
                &format!("dice empty smooth {smooth}"),
            );
            let grads = l.sum_all().unwrap().backward().unwrap();
            assert_all_finite(grads.get(x.as_tensor()).unwrap(), "dice empty grad");
        }
    }
}

#[test]
fn losses_on_empty_batches() {
    for dt in [DType::F32, DType::F64] {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::zeros((0, 1, 4, 4), dt, &dev).unwrap()).unwrap();
        let y = Tensor::zeros((0, 1, 4, 4), dt, &dev).unwrap();
        let bce = loss::bce_with_logits(x.as_tensor(), &y).unwrap();
        assert_eq!(bce.dims(), &[0, 1, 4, 4]);
        let focal = loss::sigmoid_focal_loss(x.as_tensor(), &y, 2.0, 0.25).unwrap();
        let dice = loss::soft_dice_loss(x.as_tensor(), &y, 1.0).unwrap();
        assert_eq!(dice.dims(), &[0]);
        let boxes = Var::from_tensor(&Tensor::zeros((0, 4), dt, &dev).unwrap()).unwrap();
        let giou =
            loss::giou_loss(boxes.as_tensor(), &Tensor::zeros((0, 4), dt, &dev).unwrap()).unwrap();
        assert_eq!(giou.dims(), &[0]);
        let l1 = loss::l1_loss(boxes.as_tensor(), boxes.as_tensor()).unwrap();
        let total = [bce, focal, dice, giou, l1]
            .iter()
            .map(|l| loss::mean_or_zero(l).unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        assert_eq!(total.dims(), &[] as &[usize]);
        assert_eq!(vec_f64(&total), vec![0.0]);
        // Backward through empty tensors works and leaves empty (finite) gradients.
        let grads = total.backward().unwrap();
        if let Some(g) = grads.get(x.as_tensor()) {
            assert_eq!(g.dims(), &[0, 1, 4, 4]);
        }
    }
}

#[test]
fn ops_reject_degenerate_arguments() {
    let empty = Tensor::zeros((1, 1, 0, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(ops::resize_bilinear(&empty, 4, 4).is_err());
    assert!(ops::resize_nearest(&empty, 4, 4).is_err());
    let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(ops::max_pool2d(&x, 0).is_err());
}
