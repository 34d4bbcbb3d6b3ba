//! Gradients flow through the prompt encoder and mask decoder: every trainable tensor, a box
//! prompt given as a variable and a mask prompt given as a variable all get non-zero gradients.

mod common;

use std::sync::Arc;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use common::{noise, reference_file, small_decoder, Res};
use sam2rad_models::checkpoint::{Checkpoint, Source, WeightsBackend};
use sam2rad_models::config::DecoderConfig;
use sam2rad_models::mask_decoder::{DecoderOutput, MaskDecoder};
use sam2rad_models::prompt_encoder::PromptEncoder;
use sam2rad_nn::loss::{bce_with_logits, mean_or_zero};

/// Mean BCE of all mask logits against a random binary target plus a squared IoU error, so every
/// mask token, hypernetwork MLP and the IoU head contribute.
fn loss(out: &DecoderOutput, seed: u64) -> Res<Tensor> {
    let target = noise(out.masks_all.dims(), seed)?
        .ge(0.0)?
        .to_dtype(DType::F32)?;
    let bce = mean_or_zero(&bce_with_logits(&out.masks_all, &target)?)?;
    let iou = out.iou_all.affine(1.0, -0.5)?.sqr()?.mean_all()?;
    Ok((bce + iou)?)
}

fn grad_norm(grads: &GradStore, t: &Tensor) -> Res<f32> {
    Ok(match grads.get(t) {
        Some(g) => g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
        None => 0.0,
    })
}

/// Fails naming the backend variables whose gradient is missing, zero or not finite.
fn assert_every_var_has_gradient(backend: &WeightsBackend, grads: &GradStore) -> Res<()> {
    let n_vars = backend.vars().len();
    let mut bad = Vec::new();
    for (name, var) in backend.vars() {
        let n = grad_norm(grads, var.as_tensor())?;
        if !(n > 0.0 && n.is_finite()) {
            bad.push(format!("{name} (|g| = {n})"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {n_vars} vars without gradient: {}",
        bad.len(),
        bad.join(", ")
    );
    Ok(())
}

/// A box in the 1024 frame and a mask prompt as variables, so gradients to them can be checked.
fn prompt_vars(batch: usize) -> Res<(Var, Var)> {
    let boxes: Vec<f32> = (0..batch)
        .flat_map(|i| {
            let o = 37.0 * i as f32;
            [150.0 + o, 120.0, 700.0 - o, 610.0 + o]
        })
        .collect();
    let boxes = Var::from_tensor(&Tensor::from_vec(boxes, (batch, 4), &Device::Cpu)?)?;
    let mask = Var::from_tensor(&(noise(&[batch, 1, 256, 256], 7)? * 4.0)?)?;
    Ok((boxes, mask))
}

#[test]
fn checkpoint_decoder_vars_and_prompts_get_gradients() -> Res<()> {
    let ckpt = Arc::new(Checkpoint::load(&reference_file(
        "sam_vit_reduced.safetensors",
    ))?);
    let backend = WeightsBackend::new(Source::File(ckpt), |k| k.starts_with("mask_decoder."));
    let vb = backend.var_builder(&Device::Cpu);
    let pe = PromptEncoder::new(32, 64, 1024, 16, vb.pp("prompt_encoder"))?;
    let dec = MaskDecoder::new(&DecoderConfig::default(), 32, vb.pp("mask_decoder"))?;
    let n_vars = backend.vars().len();
    let expected = backend
        .used()
        .keys()
        .filter(|k| k.starts_with("mask_decoder."))
        .count();
    assert_eq!(
        n_vars, expected,
        "every mask_decoder tensor should be a variable"
    );

    let (boxes, mask) = prompt_vars(1)?;
    let embedding = noise(&[1, 32, 64, 64], 1)?;
    let (sparse, dense) = pe.forward(None, Some(boxes.as_tensor()), Some(mask.as_tensor()))?;
    let out = dec.forward_full(&embedding, &pe.get_dense_pe()?, &sparse, &dense)?;
    let grads = loss(&out, 2)?.backward()?;

    assert_every_var_has_gradient(&backend, &grads)?;
    let gb = grad_norm(&grads, boxes.as_tensor())?;
    let gm = grad_norm(&grads, mask.as_tensor())?;
    println!("{n_vars} decoder vars with gradients; |d/dbox| = {gb:.3e}, |d/dmask| = {gm:.3e}");
    assert!(gb > 0.0 && gb.is_finite(), "box prompt gradient is {gb}");
    assert!(gm > 0.0 && gm.is_finite(), "mask prompt gradient is {gm}");
    Ok(())
}

#[test]
fn random_tiny_model_every_var_gets_gradient() -> Res<()> {
    let backend = WeightsBackend::new(Source::Random { seed: 11, std: 0.3 }, |_| true);
    let vb = backend.var_builder(&Device::Cpu);
    let cfg = small_decoder();
    let dim = 16;
    let pe = PromptEncoder::new(dim, 64, 1024, 16, vb.pp("prompt_encoder"))?;
    let dec = MaskDecoder::new(&cfg, dim, vb.pp("mask_decoder"))?;
    let dense_pe = pe.get_dense_pe()?;

    // Pass 1 (batch 2): clicks of every label, a box and a mask prompt, one embedding per row.
    let (boxes, mask) = prompt_vars(2)?;
    let coords = Tensor::new(
        &[[[300f32, 200.], [640., 480.]], [[100., 900.], [512., 512.]]],
        &Device::Cpu,
    )?;
    let labels = Tensor::new(&[[1i64, 0], [0, 1]], &Device::Cpu)?;
    let (sparse, dense) = pe.forward(
        Some((&coords, &labels)),
        Some(boxes.as_tensor()),
        Some(mask.as_tensor()),
    )?;
    let out1 = dec.forward_full(&noise(&[2, dim, 64, 64], 3)?, &dense_pe, &sparse, &dense)?;
    // Pass 2 (batch 1, shared embedding): clicks without a box (padding token), no mask prompt.
    let (sparse, dense) = pe.forward(
        Some((&coords.narrow(0, 0, 1)?, &labels.narrow(0, 0, 1)?)),
        None,
        None,
    )?;
    let out2 = dec.forward_full(&noise(&[1, dim, 64, 64], 4)?, &dense_pe, &sparse, &dense)?;
    let grads = (loss(&out1, 5)? + loss(&out2, 6)?)?.backward()?;

    let n_vars = backend.vars().len();
    assert_eq!(
        n_vars,
        backend.used().len(),
        "every tensor should be a variable"
    );
    assert_every_var_has_gradient(&backend, &grads)?;
    assert!(
        grad_norm(&grads, boxes.as_tensor())? > 0.0,
        "no gradient reaches the box prompt"
    );
    assert!(
        grad_norm(&grads, mask.as_tensor())? > 0.0,
        "no gradient reaches the mask prompt"
    );
    println!("{n_vars} vars of the tiny random model all have gradients");
    Ok(())
}

/// In f64, the analytic gradients w.r.t. the box and mask prompts match central differences
/// (checks the backward of the conv, LayerNorm2d, GELU, Fourier-feature and attention ops).
#[test]
fn prompt_gradients_match_finite_differences() -> Res<()> {
    let backend = WeightsBackend::new(Source::Random { seed: 5, std: 0.3 }, |_| false);
    let vb = backend.var_builder(&Device::Cpu).set_dtype(DType::F64);
    let cfg = small_decoder();
    let dim = 16;
    let pe = PromptEncoder::new(dim, 64, 1024, 16, vb.pp("prompt_encoder"))?;
    let dec = MaskDecoder::new(&cfg, dim, vb.pp("mask_decoder"))?;
    let dense_pe = pe.get_dense_pe()?;
    let embedding = noise(&[1, dim, 64, 64], 9)?.to_dtype(DType::F64)?;
    let target = noise(&[1, 4, 256, 256], 10)?
        .ge(0.0)?
        .to_dtype(DType::F64)?;
    let f = |boxes: &Tensor, mask: &Tensor| -> Res<Tensor> {
        let (sparse, dense) = pe.forward(None, Some(boxes), Some(mask))?;
        let out = dec.forward_full(&embedding, &dense_pe, &sparse, &dense)?;
        Ok(mean_or_zero(&bce_with_logits(&out.masks_all, &target)?)?)
    };
    let boxes = Var::from_tensor(&Tensor::new(&[[150f64, 120., 700., 610.]], &Device::Cpu)?)?;
    let mask = Var::from_tensor(&(noise(&[1, 1, 256, 256], 7)? * 4.0)?.to_dtype(DType::F64)?)?;
    let grads = f(boxes.as_tensor(), mask.as_tensor())?.backward()?;
    // Steps are large enough for the mean over 2^18 logits not to drown the difference in
    // rounding; the box moves by half a pixel, where the Fourier features are still smooth.
    for (name, x, dir, eps) in [
        (
            "box",
            boxes.as_tensor(),
            Tensor::new(&[[0.3f64, -0.7, 0.5, 0.2]], &Device::Cpu)?,
            0.5,
        ),
        (
            "mask",
            mask.as_tensor(),
            noise(&[1, 1, 256, 256], 8)?.to_dtype(DType::F64)?,
            1e-3,
        ),
    ] {
        let g = grads.get(x).ok_or("no gradient")?;
        let analytic = (g * &dir)?.sum_all()?.to_scalar::<f64>()?;
        let (xp, xm) = ((x + (&dir * eps)?)?, (x - (&dir * eps)?)?);
        let (lp, lm) = if name == "box" {
            (f(&xp, mask.as_tensor())?, f(&xm, mask.as_tensor())?)
        } else {
            (f(boxes.as_tensor(), &xp)?, f(boxes.as_tensor(), &xm)?)
        };
        let numeric = (lp.to_scalar::<f64>()? - lm.to_scalar::<f64>()?) / (2.0 * eps);
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
        println!("{name}: analytic {analytic:.9e}, numeric {numeric:.9e}, rel {rel:.2e}");
        assert!(
            rel < 1e-4,
            "{name} gradient: analytic {analytic} vs numeric {numeric}"
        );
    }
    Ok(())
}
