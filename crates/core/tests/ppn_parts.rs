//! Building blocks of the PPN: the im2col convolution against candle's `conv2d` and against
//! central differences (f64), and the sine position codes against their formulas.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::{noise, Res};
use sam2rad_core::conv::ConvNhwc;
use sam2rad_core::ppn::{sine_pe_1d, sine_pe_2d};

const DEV: Device = Device::Cpu;

fn conv_vb(
    k: usize,
    inp: usize,
    out: usize,
    dtype: DType,
) -> Res<(VarBuilder<'static>, Tensor, Tensor)> {
    let w = noise(&[out, inp, k, k], 1)?.to_dtype(dtype)?;
    let b = noise(&[out], 2)?.to_dtype(dtype)?;
    let map = HashMap::from([
        ("weight".to_string(), w.clone()),
        ("bias".to_string(), b.clone()),
    ]);
    Ok((VarBuilder::from_tensors(map, dtype, &DEV), w, b))
}

#[test]
fn conv_matches_candle_conv2d() -> Res<()> {
    for k in [1, 3] {
        let (vb, w, b) = conv_vb(k, 5, 3, DType::F32)?;
        let conv = ConvNhwc::new(5, 3, k, vb)?;
        let x = noise(&[2, 5, 7, 6], 3)?;
        let ours = conv
            .forward(&x.permute((0, 2, 3, 1))?)?
            .permute((0, 3, 1, 2))?;
        let reference = x
            .conv2d(&w, k / 2, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
        let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "kernel {k}: differs from conv2d by {diff}");
    }
    Ok(())
}

#[test]
fn conv_gradients_match_finite_differences() -> Res<()> {
    let (vb, _, _) = conv_vb(3, 3, 2, DType::F64)?;
    let conv = ConvNhwc::new(3, 2, 3, vb)?;
    let x = Var::from_tensor(&noise(&[1, 4, 5, 3], 4)?.to_dtype(DType::F64)?)?;
    let r = noise(&[1, 4, 5, 2], 5)?.to_dtype(DType::F64)?;
    let f =
        |x: &Tensor| -> Res<f64> { Ok(conv.forward(x)?.mul(&r)?.sum_all()?.to_scalar::<f64>()?) };
    let grads = conv
        .forward(x.as_tensor())?
        .mul(&r)?
        .sum_all()?
        .backward()?;
    let g: Vec<f64> = grads
        .get(x.as_tensor())
        .ok_or("no gradient")?
        .flatten_all()?
        .to_vec1()?;
    let x0: Vec<f64> = x.as_tensor().flatten_all()?.to_vec1()?;
    let h = 1e-6;
    for i in (0..x0.len()).step_by(7) {
        let mut plus = x0.clone();
        plus[i] += h;
        let mut minus = x0.clone();
        minus[i] -= h;
        let fp = f(&Tensor::from_vec(plus, (1, 4, 5, 3), &DEV)?)?;
        let fm = f(&Tensor::from_vec(minus, (1, 4, 5, 3), &DEV)?)?;
        let fd = (fp - fm) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() < 1e-6,
            "input {i}: analytic {} vs numeric {fd}",
            g[i]
        );
    }
    Ok(())
}

#[test]
fn sine_codes_follow_their_formulas() -> Res<()> {
    let d = 8;
    let q: Vec<Vec<f32>> = sine_pe_1d(3, d, &DEV)?.squeeze(0)?.to_vec2()?;
    for (i, row) in q.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let a = i as f64 / 10000f64.powf((2 * (c / 2)) as f64 / d as f64);
            let want = if c.is_multiple_of(2) {
                a.sin()
            } else {
                a.cos()
            };
            assert!((v as f64 - want).abs() < 1e-6, "1-D code ({i}, {c})");
        }
    }
    let (h, w) = (2, 3);
    let k: Vec<Vec<f32>> = sine_pe_2d(h, w, d, &DEV)?.squeeze(0)?.to_vec2()?;
    assert_eq!(k.len(), h * w);
    let two_pi = 2.0 * std::f64::consts::PI;
    for y in 0..h {
        for x in 0..w {
            let row = &k[y * w + x];
            for c in 0..d / 2 {
                let f = 10000f64.powf((2 * (c / 2)) as f64 / (d / 2) as f64);
                let ay = (y + 1) as f64 / (h as f64 + 1e-6) * two_pi / f;
                let ax = (x + 1) as f64 / (w as f64 + 1e-6) * two_pi / f;
                let (wy, wx) = if c.is_multiple_of(2) {
                    (ay.sin(), ax.sin())
                } else {
                    (ay.cos(), ax.cos())
                };
                assert!(
                    (row[c] as f64 - wy).abs() < 1e-6,
                    "2-D code y ({y}, {x}, {c})"
                );
                assert!(
                    (row[d / 2 + c] as f64 - wx).abs() < 1e-6,
                    "2-D code x ({y}, {x}, {c})"
                );
            }
        }
    }
    Ok(())
}
