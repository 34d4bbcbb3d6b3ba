//! Sam2Rad assembly on tiny random base models (SAM ViT and SAM 2.1 Hiera): output shapes for
//! every PPN variant and decoder mode, gradients reaching every trainable tensor, LoRA as an exact
//! no-op at init, the trainable sets per mode, the box range, dropout seeding, feature caching
//! and run-checkpoint loading.

mod common;

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Device, Tensor};
use common::{max_abs_diff, noise, rect_targets, tiny_sam, tiny_sam2, Res};
use sam2rad_core::{
    extract, sam2rad_loss, DecoderMode, Features, LossConfig, Phase, PpnVariant, RowPrompts, Rows,
    Sam2Rad, Sam2RadConfig,
};
use sam2rad_models::checkpoint::{Checkpoint, Source, WeightsBackend};
use sam2rad_models::config::SamConfig;
use sam2rad_models::mask_decoder::MaskDecoder;
use sam2rad_models::sam::Prompts;

const DEV: Device = Device::Cpu;

fn config(base: SamConfig, mode: DecoderMode, variant: PpnVariant) -> Sam2RadConfig {
    Sam2RadConfig {
        num_tokens: 4,
        ppn: variant,
        decoder: mode,
        ..Sam2RadConfig::new(base, 2)
    }
}

/// The base is random normal rather than `Source::Init`: the init hints of some official keys
/// are zero (the output upscaling's transposed convs, the prompt encoder's Fourier matrix), which
/// would make every mask identically zero and starve the decoder of gradients.
fn build(cfg: &Sam2RadConfig, seed: u64) -> Res<Sam2Rad> {
    Ok(Sam2Rad::new(
        cfg,
        Source::Random { seed: 1, std: 0.2 },
        Source::Init { seed },
        &DEV,
    )?)
}

/// Features of `b` random images through the model's frozen encoder.
fn features(model: &Sam2Rad, b: usize, seed: u64) -> Res<Features> {
    let s = model.config().base.image_size;
    Ok(extract(model.base(), &noise(&[b, 3, s, s], seed)?)?)
}

/// GT box + two clicks per row (frame pixels), every row different.
fn user_prompts(r: usize, s: usize) -> Res<RowPrompts> {
    let sf = s as f32;
    let mut boxes = Vec::new();
    let mut xy = Vec::new();
    for i in 0..r {
        let o = 0.05 * i as f32;
        boxes.extend([(0.1 + o) * sf, 0.2 * sf, (0.6 + o) * sf, 0.7 * sf]);
        xy.extend([(0.3 + o) * sf, 0.4 * sf, 0.9 * sf, (0.1 + o) * sf]);
    }
    let labels: Vec<i64> = (0..r).flat_map(|_| [1i64, 0]).collect();
    Ok(RowPrompts {
        learned: true,
        boxes: Some(Tensor::from_vec(boxes, (r, 4), &DEV)?),
        points: Some((
            Tensor::from_vec(xy, (r, 2, 2), &DEV)?,
            Tensor::from_vec(labels, (r, 2), &DEV)?,
        )),
        mask: None,
    })
}

#[test]
fn output_shapes_every_variant_and_mode() -> Res<()> {
    for (base, name) in [(tiny_sam(), "sam"), (tiny_sam2()?, "sam2")] {
        let e = base.embedding_size();
        let d = base.prompt_embed_dim;
        for variant in [PpnVariant::Hierarchical, PpnVariant::Single] {
            for mode in [DecoderMode::Frozen, DecoderMode::Lora, DecoderMode::Full] {
                let cfg = config(base.clone(), mode, variant);
                let model = build(&cfg, 3)?;
                let feats = features(&model, 2, 9)?;
                assert_eq!(feats.levels.len(), 3);
                let rows = Rows::all(2, 2);
                let ppn = model.ppn().forward(
                    &feats,
                    &rows,
                    model.base().prompt_encoder(),
                    Phase::Eval,
                )?;
                let what = format!("{name} {variant:?} {mode:?}");
                assert_eq!(ppn.sparse.dims(), &[4, 4, d], "{what}: sparse");
                assert_eq!(ppn.dense.dims(), &[4, d, e, e], "{what}: dense");
                assert_eq!(
                    ppn.mask_prompt_logits.dims(),
                    &[4, 1, 4 * e, 4 * e],
                    "{what}"
                );
                assert_eq!(ppn.boxes.dims(), &[4, 4], "{what}: boxes");
                for prompts in [RowPrompts::learned(), user_prompts(4, base.image_size)?] {
                    let out = model.forward(&feats, &rows, &prompts, Phase::Eval)?;
                    assert_eq!(out.mask_logits.dims(), &[4, 1, 4 * e, 4 * e], "{what}");
                    assert_eq!(out.iou.dims(), &[4], "{what}: iou");
                    assert_eq!(out.object_logits.dims(), &[4], "{what}: objectness");
                    assert!(out.mask_prompt_logits.is_some() && out.boxes.is_some());
                }
                // Manual mode with only a mask prompt: no sparse token at all.
                let manual = RowPrompts {
                    learned: false,
                    boxes: None,
                    points: None,
                    mask: Some(noise(&[4, 1, 4 * e, 4 * e], 2)?),
                };
                let out = model.forward(&feats, &rows, &manual, Phase::Eval)?;
                assert_eq!(out.mask_logits.dims(), &[4, 1, 4 * e, 4 * e], "{what}");
                assert!(out.boxes.is_none() && out.mask_prompt_logits.is_none());
            }
        }
    }
    Ok(())
}

/// Names of `vars` whose gradient is missing, zero or not finite.
fn missing(vars: &[(String, candle_core::Var)], grads: &GradStore) -> Res<Vec<String>> {
    let mut bad = Vec::new();
    for (k, v) in vars {
        let norm = match grads.get(v.as_tensor()) {
            Some(g) => g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
            None => 0.0,
        };
        if !(norm > 0.0 && norm.is_finite()) {
            bad.push(format!("{k} ({norm})"));
        }
    }
    Ok(bad)
}

#[test]
fn every_trainable_tensor_gets_a_gradient() -> Res<()> {
    let cases = [
        (tiny_sam(), DecoderMode::Frozen, PpnVariant::Hierarchical),
        (tiny_sam(), DecoderMode::Lora, PpnVariant::Hierarchical),
        (tiny_sam(), DecoderMode::Full, PpnVariant::Hierarchical),
        (tiny_sam(), DecoderMode::Lora, PpnVariant::Single),
        (tiny_sam2()?, DecoderMode::Frozen, PpnVariant::Hierarchical),
        (tiny_sam2()?, DecoderMode::Lora, PpnVariant::Hierarchical),
        (tiny_sam2()?, DecoderMode::Full, PpnVariant::Single),
    ];
    for (base, mode, variant) in cases {
        let s = base.image_size;
        let cfg = config(base, mode, variant);
        let model = build(&cfg, 5)?;
        let vars = model.trainable_vars();
        // LoRA's B starts at 0, which makes A's gradient exactly 0: move B off zero first.
        for (i, (k, v)) in vars.decoder.iter().enumerate() {
            if k.starts_with("lora.") && k.ends_with(".b") {
                v.set(&noise(v.dims(), 100 + i as u64)?.affine(0.05, 0.0)?)?;
            }
        }
        let feats = features(&model, 2, 11)?;
        let rows = Rows::all(2, 2);
        // Rows 0 and 2 have foreground, 1 and 3 are empty.
        let q = s / 4;
        let targets = rect_targets(
            s,
            &[
                Some([q, q, 3 * q, 2 * q]),
                None,
                Some([0, q, q, 3 * q]),
                None,
            ],
        )?;
        let lc = LossConfig::default();
        let learned = model.forward(
            &feats,
            &rows,
            &RowPrompts::learned(),
            Phase::Train { seed: 1 },
        )?;
        let mixed = model.forward(
            &feats,
            &rows,
            &user_prompts(4, s)?,
            Phase::Train { seed: 2 },
        )?;
        let l1 = sam2rad_loss(&learned, &targets, &lc)?;
        let l2 = sam2rad_loss(&mixed, &targets, &lc)?;
        assert_eq!(l1.num_foreground, 2);
        let grads = (l1.total + l2.total)?.backward()?;
        let what = format!("{} {mode:?} {variant:?}", cfg.base.name);
        let mut bad = missing(&vars.prompt, &grads)?;
        bad.extend(missing(&vars.decoder, &grads)?);
        assert!(
            bad.is_empty(),
            "{what}: {} of {} trainable tensors without gradient: {}",
            bad.len(),
            vars.prompt.len() + vars.decoder.len(),
            bad.join(", ")
        );
        assert!(!vars.prompt.is_empty());
        assert_eq!(
            vars.decoder.is_empty(),
            mode == DecoderMode::Frozen,
            "{what}"
        );
    }
    Ok(())
}

#[test]
fn trainable_sets_per_mode() -> Res<()> {
    for base in [tiny_sam(), tiny_sam2()?] {
        let sam2 = base.family == sam2rad_models::config::Family::Sam2;
        let dec = if sam2 {
            "sam_mask_decoder."
        } else {
            "mask_decoder."
        };
        for mode in [DecoderMode::Frozen, DecoderMode::Lora, DecoderMode::Full] {
            let model = build(&config(base.clone(), mode, PpnVariant::Hierarchical), 3)?;
            let vars = model.trainable_vars();
            let prompt: Vec<&str> = vars.prompt.iter().map(|(k, _)| k.as_str()).collect();
            let decoder: Vec<&str> = vars.decoder.iter().map(|(k, _)| k.as_str()).collect();
            assert!(prompt.contains(&"ppn.queries"));
            for k in &prompt {
                let objectness = if sam2 {
                    k.starts_with("sam_mask_decoder.obj_score_token")
                        || k.starts_with("sam_mask_decoder.pred_obj_score_head")
                } else {
                    k.starts_with("objectness.")
                };
                assert!(
                    k.starts_with("ppn.") || objectness,
                    "{k} in the prompt group"
                );
            }
            let has_obj = prompt.iter().any(|k| {
                k.starts_with("objectness.head") || k.starts_with("sam_mask_decoder.pred_obj")
            });
            assert!(has_obj, "{mode:?}: no objectness head");
            for k in &decoder {
                assert!(k.starts_with("lora.") || k.starts_with(dec), "{k}");
                assert!(
                    !k.contains("iou_prediction_head") && !k.contains("conv_s"),
                    "{k}"
                );
                assert!(!k.contains("output_hypernetworks_mlps.1"), "{k}");
            }
            let lora = decoder.iter().filter(|k| k.starts_with("lora.")).count();
            match mode {
                DecoderMode::Frozen => assert!(decoder.is_empty(), "frozen: {decoder:?}"),
                DecoderMode::Lora => {
                    // 7 attentions × (q, v) × (A, B).
                    assert_eq!(lora, 28, "{decoder:?}");
                    assert!(decoder.contains(&"lora.layers.0.self_attn.q.a"));
                    assert!(decoder.contains(&"lora.final_attn_token_to_image.v.b"));
                    for k in decoder.iter().filter(|k| !k.starts_with("lora.")) {
                        let rest = k.strip_prefix(dec).unwrap_or(k);
                        assert!(
                            rest.starts_with("mask_tokens")
                                || rest.starts_with("output_upscaling")
                                || rest.starts_with("output_hypernetworks_mlps.0."),
                            "{k} trainable in lora mode"
                        );
                    }
                }
                DecoderMode::Full => {
                    assert_eq!(lora, 0);
                    let t = format!("{dec}transformer.layers.1.norm4.weight");
                    assert!(decoder.contains(&t.as_str()));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn lora_with_zero_b_is_bit_identical() -> Res<()> {
    let base = tiny_sam();
    let d = base.prompt_embed_dim;
    let backend = WeightsBackend::new(Source::Random { seed: 4, std: 0.2 }, |_| false);
    let vb = backend.var_builder(&DEV);
    let plain = MaskDecoder::new(&base.decoder, d, vb.pp("mask_decoder"))?;
    let mut adapted = plain.clone();
    let lora = WeightsBackend::new(Source::Init { seed: 8 }, |_| true);
    adapted.attach_lora(8, 8.0, lora.var_builder(&DEV).pp("lora"))?;
    assert_eq!(lora.vars().len(), 28);
    let e = base.embedding_size();
    let image = noise(&[2, d, e, e], 1)?;
    let pe = noise(&[1, d, e, e], 2)?;
    let sparse = noise(&[2, 3, d], 3)?;
    let dense = noise(&[2, d, e, e], 4)?;
    let a = plain.forward_full(&image, &pe, &sparse, &dense)?;
    let b = adapted.forward_full(&image, &pe, &sparse, &dense)?;
    let va: Vec<f32> = a.masks_all.flatten_all()?.to_vec1()?;
    let vb_: Vec<f32> = b.masks_all.flatten_all()?.to_vec1()?;
    assert!(va == vb_, "LoRA with B = 0 changed the masks");
    let ia: Vec<f32> = a.iou_all.flatten_all()?.to_vec1()?;
    let ib: Vec<f32> = b.iou_all.flatten_all()?.to_vec1()?;
    assert!(ia == ib, "LoRA with B = 0 changed the IoU");
    // Moving B off zero does change the output (the update is wired in).
    for (k, v) in lora.vars() {
        if k.ends_with(".b") {
            v.set(&noise(v.dims(), 7)?)?;
        }
    }
    let c = adapted.forward_full(&image, &pe, &sparse, &dense)?;
    let diff = max_abs_diff(&c.masks_all, &a.masks_all)?;
    assert!(diff > 1e-3, "LoRA update has no effect ({diff})");
    Ok(())
}

#[test]
fn boxes_lie_in_the_frame_and_are_ordered() -> Res<()> {
    for base in [tiny_sam(), tiny_sam2()?] {
        let model = build(
            &config(base, DecoderMode::Frozen, PpnVariant::Hierarchical),
            6,
        )?;
        let feats = features(&model, 2, 3)?;
        // Large features push the box head towards saturation.
        let big = Features {
            embed: (&feats.embed * 50.0)?,
            levels: feats
                .levels
                .iter()
                .map(|l| l * 50.0)
                .collect::<Result<_, _>>()?,
            high_res: feats.high_res.clone(),
        };
        for f in [&feats, &big] {
            let out = model.forward(f, &Rows::all(2, 2), &RowPrompts::learned(), Phase::Eval)?;
            let boxes: Vec<Vec<f32>> = out.boxes.ok_or("no boxes")?.to_vec2()?;
            for b in boxes {
                assert!(b.iter().all(|v| (0.0..=1.0).contains(v)), "{b:?}");
                assert!(b[0] <= b[2] && b[1] <= b[3], "unordered box {b:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn dropout_is_seeded_and_train_only() -> Res<()> {
    let model = build(
        &config(tiny_sam(), DecoderMode::Lora, PpnVariant::Hierarchical),
        2,
    )?;
    let feats = features(&model, 1, 4)?;
    let rows = Rows::all(1, 2);
    let run = |phase| -> Res<Vec<f32>> {
        let out = model.forward(&feats, &rows, &RowPrompts::learned(), phase)?;
        let m = out.mask_prompt_logits.ok_or("no mask prompt")?;
        Ok(m.flatten_all()?.to_vec1()?)
    };
    let eval = run(Phase::Eval)?;
    assert_eq!(eval, run(Phase::Eval)?);
    let a = run(Phase::Train { seed: 1 })?;
    assert_eq!(
        a,
        run(Phase::Train { seed: 1 })?,
        "same seed, different masks"
    );
    assert_ne!(a, run(Phase::Train { seed: 2 })?, "seed ignored");
    assert_ne!(a, eval, "no dropout in training");
    Ok(())
}

#[test]
fn features_cache_roundtrip_and_row_selection() -> Res<()> {
    for base in [tiny_sam(), tiny_sam2()?] {
        let model = build(
            &config(base, DecoderMode::Frozen, PpnVariant::Hierarchical),
            2,
        )?;
        let feats = features(&model, 2, 4)?;
        let named = feats.to_named_tensors();
        let expect = if feats.high_res.is_some() {
            ["embed", "high_res.0", "high_res.1"]
        } else {
            ["embed", "levels.1", "levels.2"]
        };
        let names: Vec<&str> = named.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, expect);
        // A cache may store f16; reading converts back to f32.
        let map: HashMap<String, Tensor> = named
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F16)?)))
            .collect::<Res<_>>()?;
        let back = Features::from_named_tensors(&map, &DEV)?;
        for (a, b) in feats.levels.iter().zip(&back.levels) {
            assert_eq!(a.dims(), b.dims());
            let err = max_abs_diff(a, b)?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-3 * scale.max(1.0), "f16 roundtrip error {err}");
        }
        assert_eq!(back.high_res.is_some(), feats.high_res.is_some());
        // Rows of images [1, 1, 0] and the batch rebuilt from single images.
        let picked = feats.rows(&[1, 1, 0])?;
        let one = feats.rows(&[1])?;
        let diff = max_abs_diff(&picked.levels[2].narrow(0, 0, 1)?, &one.levels[2])?;
        assert_eq!(diff, 0.0);
        assert_eq!(picked.embed.dim(0)?, 3);
        let parts = [feats.rows(&[0])?, feats.rows(&[1])?];
        let joined = Features::cat(&parts)?;
        let diff = max_abs_diff(&joined.embed, &feats.embed)?;
        assert_eq!(diff, 0.0);
        assert!(feats.rows(&[2]).is_err(), "out-of-range image accepted");
    }
    Ok(())
}

#[test]
fn run_checkpoint_restores_the_model() -> Res<()> {
    let cfg = config(tiny_sam(), DecoderMode::Lora, PpnVariant::Hierarchical);
    let a = build(&cfg, 21)?;
    // Make the LoRA update non-trivial so the decoder side matters too.
    for (k, v) in a.trainable_vars().decoder {
        v.set(&(v.as_tensor() + noise(v.dims(), k.len() as u64)?.affine(0.01, 0.0)?)?)?;
    }
    let feats = features(&a, 2, 5)?;
    let rows = Rows::all(2, 2);
    let want = a.forward(&feats, &rows, &RowPrompts::learned(), Phase::Eval)?;

    let path = std::env::temp_dir().join(format!(
        "sam2rad-core-run-{}.safetensors",
        std::process::id()
    ));
    candle_core::safetensors::save(&a.trained_tensors().into_iter().collect(), &path)?;
    let ckpt = std::sync::Arc::new(Checkpoint::load(&path)?);
    let _ = std::fs::remove_file(&path);
    let b = Sam2Rad::new(
        &cfg,
        Source::Random { seed: 1, std: 0.2 },
        Source::File(ckpt.clone()),
        &DEV,
    )?;
    let got = b.forward(&feats, &rows, &RowPrompts::learned(), Phase::Eval)?;
    let diff = max_abs_diff(&got.mask_logits, &want.mask_logits)?;
    assert_eq!(diff, 0.0, "restored model differs");

    // load_trained on a fresh model does the same; a foreign key is refused.
    let c = build(&cfg, 99)?;
    c.load_trained(&ckpt.tensors)?;
    let got = c.forward(&feats, &rows, &RowPrompts::learned(), Phase::Eval)?;
    let diff = max_abs_diff(&got.mask_logits, &want.mask_logits)?;
    assert_eq!(diff, 0.0);
    let mut extra = ckpt.tensors.clone();
    extra.insert("ppn.unknown".into(), Tensor::zeros(1, DType::F32, &DEV)?);
    assert!(c.load_trained(&extra).is_err());
    let frozen = config(tiny_sam(), DecoderMode::Frozen, PpnVariant::Hierarchical);
    assert!(
        build(&frozen, 1)?.load_trained(&ckpt.tensors).is_err(),
        "a LoRA checkpoint loaded into a frozen-decoder model"
    );
    Ok(())
}

#[test]
fn sam2_manual_mode_matches_the_base_predictor() -> Res<()> {
    let cfg = config(tiny_sam2()?, DecoderMode::Frozen, PpnVariant::Hierarchical);
    let model = build(&cfg, 2)?;
    let s = cfg.base.image_size;
    let input = noise(&[1, 3, s, s], 8)?;
    let feats = extract(model.base(), &input)?;
    let bx = [30f32, 40., 150., 200.];
    let click = (90f32, 100f32, 1i64);
    let prompts = RowPrompts {
        learned: false,
        boxes: Some(Tensor::new(&[bx], &DEV)?),
        points: Some((
            Tensor::new(&[[[click.0, click.1]]], &DEV)?,
            Tensor::new(&[[click.2]], &DEV)?,
        )),
        mask: None,
    };
    let ours = model.forward(&feats, &Rows::all(1, 1), &prompts, Phase::Eval)?;
    let embedding = model.base().embed(&input)?;
    let official = Prompts {
        points: vec![click],
        boxes: Some(bx),
        mask_input: None,
    };
    let pred = model
        .base()
        .predict(&embedding, (s, s), (s, s), &official, false)?;
    let diff = max_abs_diff(&ours.mask_logits, &pred.low_res_logits)?;
    assert!(
        diff < 1e-4,
        "manual mode differs from the predictor by {diff}"
    );
    let obj = pred
        .object_score_logits
        .ok_or("no object score")?
        .flatten_all()?;
    let diff = max_abs_diff(&ours.object_logits, &obj)?;
    assert!(diff < 1e-4, "object score differs by {diff}");
    Ok(())
}
