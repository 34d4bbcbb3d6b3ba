//! SAM 2.1 prompt encoder + mask decoder + predictor against the official `SAM2ImagePredictor`
//! outputs stored in `fixtures/reference` (reduced Hiera, width 32), fed with the stored image
//! features; an end-to-end run from the PNG; and the key/shape layout of the official presets.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::{
    check_elem_count, check_no_flips, fixture, get, load_reference, manifest, manifest_shapes,
    max_abs, max_abs_diff, reference_file, small_decoder, Res,
};
use sam2rad_models::checkpoint::{diff_key_shapes, Checkpoint, Source, WeightsBackend};
use sam2rad_models::config::{DecoderConfig, SamConfig};
use sam2rad_models::mask_decoder::{DecoderVariant, DynamicMultimask, MaskDecoder};
use sam2rad_models::preprocess::load_rgb;
use sam2rad_models::preprocess_sam2::sam2_preprocess;
use sam2rad_models::prompt_encoder::PromptEncoder;
use sam2rad_models::sam::{AnySam, ImageEmbedding, Prediction, Prompts};
use sam2rad_models::sam2::{Sam2, SAM2_VIDEO_KEY_PREFIXES};
use sam2rad_models::sam2_image_encoder::Sam2Features;
use sam2rad_nn::ops::resize_bilinear;

const ORIGINAL: (usize, usize) = (300, 400);
const SQUARE: (usize, usize) = (1024, 1024);
const OUTPUTS: &str = "sam2.1_hiera_reduced_outputs.safetensors";

/// (case, points, box, mask prompt, multimask, stability threshold).
const CASES: &[(&str, bool, bool, bool, bool, f32)] = &[
    ("points_multimask", true, false, false, true, 0.98),
    ("box_single", false, true, false, false, 0.98),
    ("points_box_mask_single", true, true, true, false, 0.98),
    ("box_single_thresh0.90", false, true, false, false, 0.90),
];

/// Max |ours − ref|, failing when it exceeds `tol · max(1, max|ref|)` (or shapes differ).
fn check(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) -> Res<f32> {
    check_elem_count(what, ours, reference)?;
    let err = max_abs_diff(&ours.reshape(reference.shape())?, reference)?;
    let scale = max_abs(reference)?.max(1.0);
    println!("{what:<56} max |Δ| = {err:.3e} (max |ref| {scale:.2})");
    if err > tol * scale {
        return Err(format!("{what}: max |Δ| {err:e} > {tol:e}·{scale}").into());
    }
    Ok(err)
}

fn config() -> Res<SamConfig> {
    Ok(SamConfig::from_json_file(&fixture(
        "configs/sam2.1_hiera_reduced.json",
    ))?)
}

/// The stored image features as the predictor's `_features`.
fn stored_features(refs: &HashMap<String, Tensor>) -> Res<Sam2Features> {
    Ok(Sam2Features {
        image_embed: get(refs, "image_embed")?.clone(),
        high_res: [
            get(refs, "high_res_feat_s0")?.clone(),
            get(refs, "high_res_feat_s1")?.clone(),
        ],
        levels: Vec::new(),
    })
}

/// The fixture prompts of one case in original pixels.
fn case_prompts(
    inputs: &HashMap<String, Tensor>,
    points: bool,
    with_box: bool,
    mask: bool,
) -> Res<Prompts> {
    let pts: Vec<Vec<f32>> = get(inputs, "points_xy")?.to_vec2()?;
    let labels: Vec<i64> = get(inputs, "labels")?.to_dtype(DType::I64)?.to_vec1()?;
    let b: Vec<f32> = get(inputs, "box_xyxy")?.to_vec1()?;
    Ok(Prompts {
        points: if points {
            pts.iter()
                .zip(&labels)
                .map(|(p, &l)| (p[0], p[1], l))
                .collect()
        } else {
            Vec::new()
        },
        boxes: with_box.then_some([b[0], b[1], b[2], b[3]]),
        mask_input: if mask {
            Some(get(inputs, "mask_input")?.clone())
        } else {
            None
        },
    })
}

/// SAM 2's `_prep_prompts` + box-as-points: `x/w·1024`, `y/h·1024` in f32, box corners
/// (labels 2, 3) before the clicks.
fn model_points(prompts: &Prompts) -> Res<Option<(Tensor, Tensor)>> {
    let (h, w) = (ORIGINAL.0 as f32, ORIGINAL.1 as f32);
    let mut xy = Vec::new();
    let mut labels = Vec::new();
    if let Some(b) = prompts.boxes {
        xy.extend([b[0] / w * 1024.0, b[1] / h * 1024.0]);
        xy.extend([b[2] / w * 1024.0, b[3] / h * 1024.0]);
        labels.extend([2i64, 3]);
    }
    for &(x, y, l) in &prompts.points {
        xy.extend([x / w * 1024.0, y / h * 1024.0]);
        labels.push(l);
    }
    if labels.is_empty() {
        return Ok(None);
    }
    let n = labels.len();
    Ok(Some((
        Tensor::from_vec(xy, (1, n, 2), &Device::Cpu)?,
        Tensor::from_vec(labels, (1, n), &Device::Cpu)?,
    )))
}

/// Worst errors over cases: low-res, IoU, object score, masks.
#[derive(Default, Debug)]
struct Worst([f32; 4]);

impl Worst {
    fn add(&mut self, i: usize, e: f32) {
        self.0[i] = self.0[i].max(e);
    }
}

/// Compares a prediction with the stored outputs of `case`.
fn check_prediction(
    case: &str,
    pred: &Prediction,
    refs: &HashMap<String, Tensor>,
    worst: &mut Worst,
) -> Res<()> {
    let r = |t: &str| get(refs, &format!("{case}.{t}"));
    worst.add(
        0,
        check(
            &format!("{case}.low_res_logits"),
            &pred.low_res_logits,
            r("low_res_logits")?,
            1e-3,
        )?,
    );
    worst.add(
        1,
        check(
            &format!("{case}.iou_predictions"),
            &pred.iou_predictions,
            r("iou_predictions")?,
            1e-4,
        )?,
    );
    let obj = pred
        .object_score_logits
        .as_ref()
        .ok_or("SAM 2 prediction without object score")?;
    worst.add(
        2,
        check(
            &format!("{case}.object_score_logits"),
            obj,
            r("object_score_logits")?,
            1e-4,
        )?,
    );
    let reference = r("masks_logits")?;
    worst.add(
        3,
        check(
            &format!("{case}.masks_logits"),
            &pred.masks_logits,
            reference,
            1e-3,
        )?,
    );
    check_no_flips(case, &pred.masks_logits, reference)
}

struct Parts {
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
}

fn build_parts(weights: &str) -> Res<Parts> {
    let ckpt = Arc::new(Checkpoint::load(&reference_file(weights))?);
    let vb = WeightsBackend::frozen(ckpt).var_builder(&Device::Cpu);
    Ok(Parts {
        prompt_encoder: PromptEncoder::new(32, 64, 1024, 16, vb.pp("sam_prompt_encoder"))?,
        mask_decoder: MaskDecoder::new_sam2(
            &DecoderConfig::default(),
            32,
            vb.pp("sam_mask_decoder"),
        )?,
    })
}

/// Prompt encoder and decoder module by module: prompt tensors, embeddings, all-token outputs,
/// stability score and the dynamic single-mask choice.
fn run_decoder_cases(weights: &str) -> Res<()> {
    println!("== weights {weights}");
    let inputs = load_reference("inputs.safetensors")?;
    let refs = load_reference(OUTPUTS)?;
    let mut parts = build_parts(weights)?;
    assert_eq!(parts.mask_decoder.variant(), DecoderVariant::Sam2);
    assert_eq!(
        parts.mask_decoder.dynamic_multimask(),
        Some(DynamicMultimask::default())
    );
    let features = stored_features(&refs)?;
    let dense_pe = parts.prompt_encoder.get_dense_pe()?;
    check("dense_pe", &dense_pe, get(&refs, "dense_pe")?, 1e-5)?;
    let mut worst = Worst::default();
    for &(case, points, with_box, mask, multimask, thresh) in CASES {
        let r = |t: &str| get(&refs, &format!("{case}.{t}"));
        parts
            .mask_decoder
            .set_dynamic_multimask(Some(DynamicMultimask {
                delta: 0.05,
                thresh,
            }));
        let prompts = case_prompts(&inputs, points, with_box, mask)?;
        let (coords, labels) = model_points(&prompts)?.ok_or("every case has points")?;
        check(
            &format!("{case}.model_point_coords"),
            &coords,
            r("model_point_coords")?,
            0.0,
        )?;
        let ref_labels: Vec<i64> = r("model_point_labels")?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(
            labels.flatten_all()?.to_vec1::<i64>()?,
            ref_labels,
            "{case}: labels"
        );

        let mask_input = match &prompts.mask_input {
            Some(m) => Some(m.reshape((1, 1, 256, 256))?),
            None => None,
        };
        let (sparse, dense) =
            parts
                .prompt_encoder
                .forward(Some((&coords, &labels)), None, mask_input.as_ref())?;
        check(
            &format!("{case}.sparse_embeddings"),
            &sparse,
            r("sparse_embeddings")?,
            1e-5,
        )?;
        if mask {
            check(
                &format!("{case}.dense_embeddings"),
                &dense,
                r("dense_embeddings")?,
                1e-5,
            )?;
        }
        let [s0, s1] = &features.high_res;
        let out = parts.mask_decoder.forward_full_high_res(
            &features.image_embed,
            Some((s0, s1)),
            &dense_pe,
            &sparse,
            &dense,
        )?;
        check(
            &format!("{case}.all_token_iou_predictions"),
            &out.iou_all,
            r("all_token_iou_predictions")?,
            1e-4,
        )?;
        let stability = out
            .singlemask_stability
            .as_ref()
            .ok_or("no stability score")?;
        // A count ratio: one logit crossing ±delta moves it by ~1/65536.
        check(
            &format!("{case}.singlemask_stability_score"),
            stability,
            r("singlemask_stability_score")?,
            1e-3,
        )?;
        let (low_res, iou) = parts.mask_decoder.select(&out, multimask)?;
        let pred = Prediction {
            masks_logits: resize_bilinear(&low_res, ORIGINAL.0, ORIGINAL.1)?,
            low_res_logits: low_res,
            iou_predictions: iou,
            object_score_logits: out.object_score_logits.clone(),
        };
        check_prediction(case, &pred, &refs, &mut worst)?;
    }
    println!(
        "worst over cases: low_res, iou, object score, masks = {:?}",
        worst.0
    );
    Ok(())
}

#[test]
fn decoder_matches_reference_safetensors() -> Res<()> {
    run_decoder_cases("sam2.1_hiera_reduced.safetensors")
}

#[test]
fn decoder_matches_reference_pt() -> Res<()> {
    run_decoder_cases("sam2.1_hiera_reduced.pt")
}

fn build_sam2(weights: &str) -> Res<Sam2> {
    let cfg = config()?;
    let backend = WeightsBackend::frozen(Arc::new(Checkpoint::load(&reference_file(weights))?));
    let sam2 = Sam2::new(&cfg, backend.var_builder(&Device::Cpu))?;
    backend.check_unexpected(SAM2_VIDEO_KEY_PREFIXES)?;
    // Without the allowance the video keys are reported.
    assert!(backend.check_unexpected(&[]).is_err());
    Ok(sam2)
}

/// `Sam2::predict` (original-pixel prompts, the full model built from the checkpoint with only
/// the video keys left over) reproduces `SAM2ImagePredictor.predict` on the stored features.
#[test]
fn predictor_matches_reference() -> Res<()> {
    let mut sam2 = build_sam2("sam2.1_hiera_reduced.pt")?;
    let inputs = load_reference("inputs.safetensors")?;
    let refs = load_reference(OUTPUTS)?;
    let features = stored_features(&refs)?;
    let mut worst = Worst::default();
    for &(case, points, with_box, mask, multimask, thresh) in CASES {
        sam2.mask_decoder
            .set_dynamic_multimask(Some(DynamicMultimask {
                delta: 0.05,
                thresh,
            }));
        let prompts = case_prompts(&inputs, points, with_box, mask)?;
        let pred = sam2.predict(&features, ORIGINAL, SQUARE, &prompts, multimask)?;
        check_prediction(case, &pred, &refs, &mut worst)?;
    }
    println!(
        "predictor worst: low_res, iou, object score, masks = {:?}",
        worst.0
    );

    // The same through `AnySam`.
    let cfg = config()?;
    let backend = WeightsBackend::frozen(Arc::new(Checkpoint::load(&reference_file(
        "sam2.1_hiera_reduced.safetensors",
    ))?));
    let any = AnySam::new(&cfg, backend.var_builder(&Device::Cpu))?;
    backend.check_unexpected(any.unexpected_allowed_prefixes())?;
    let emb = ImageEmbedding::Sam2(features);
    let prompts = case_prompts(&inputs, false, true, false)?;
    let pred = any.predict(&emb, ORIGINAL, SQUARE, &prompts, false)?;
    check_prediction("box_single", &pred, &refs, &mut worst)?;
    let (sparse, dense) = any.prompt_encoder().forward(None, None, None)?;
    let out = any.decode_full(&emb, &sparse, &dense)?;
    assert_eq!(out.masks_all.dims(), &[1, 4, 256, 256]);
    assert!(any
        .predict(
            &ImageEmbedding::Sam(emb.image_embed().clone()),
            ORIGINAL,
            SQUARE,
            &prompts,
            false
        )
        .is_err());
    Ok(())
}

/// Longest-side + pad inputs: coordinates follow SAM 1's `apply_coords` and masks are cropped
/// to the resized image before the final resize.
#[test]
fn longest_side_geometry() -> Res<()> {
    let sam2 = build_sam2("sam2.1_hiera_reduced.safetensors")?;
    let refs = load_reference(OUTPUTS)?;
    let features = stored_features(&refs)?;
    let input = (768, 1024);
    let prompts = Prompts {
        points: vec![(200.0, 150.0, 1)],
        boxes: Some([40.0, 30.0, 300.0, 270.0]),
        mask_input: None,
    };
    let pred = sam2.predict(&features, ORIGINAL, input, &prompts, true)?;
    // Same prompt tokens built by hand: box corners then the click, scaled by 1024/400 = 768/300.
    let coords = Tensor::new(
        &[[[102.4f32, 76.8], [768.0, 691.2], [512.0, 384.0]]],
        &Device::Cpu,
    )?;
    let labels = Tensor::new(&[[2i64, 3, 1]], &Device::Cpu)?;
    let (sparse, dense) = sam2
        .prompt_encoder
        .forward(Some((&coords, &labels)), None, None)?;
    let [s0, s1] = &features.high_res;
    let out = sam2.mask_decoder.forward_full_high_res(
        &features.image_embed,
        Some((s0, s1)),
        &sam2.prompt_encoder.get_dense_pe()?,
        &sparse,
        &dense,
    )?;
    let (low, _) = sam2.mask_decoder.select(&out, true)?;
    check(
        "longest-side low_res_logits",
        &pred.low_res_logits,
        &low,
        1e-5,
    )?;
    let full = resize_bilinear(&low, 1024, 1024)?;
    let expected = resize_bilinear(&full.narrow(2, 0, 768)?, 300, 400)?;
    check(
        "longest-side masks_logits",
        &pred.masks_logits,
        &expected,
        1e-6,
    )?;
    Ok(())
}

/// Two prompt rows in one batch (shared image features) give the rows of two single calls,
/// including the per-row dynamic single-mask choice.
#[test]
fn batched_prompts_match_single_rows() -> Res<()> {
    let parts = build_parts("sam2.1_hiera_reduced.safetensors")?;
    let refs = load_reference(OUTPUTS)?;
    let features = stored_features(&refs)?;
    let pe = parts.prompt_encoder.get_dense_pe()?;
    let coords = Tensor::new(
        &[
            [[204.8f32, 136.5], [844.8, 887.5]],
            [[640.0, 409.6], [310.0, 694.0]],
        ],
        &Device::Cpu,
    )?;
    let labels = Tensor::new(&[[2i64, 3], [1, 0]], &Device::Cpu)?;
    let (sparse, dense) = parts
        .prompt_encoder
        .forward(Some((&coords, &labels)), None, None)?;
    let [s0, s1] = &features.high_res;
    let run = |sp: &Tensor, de: &Tensor| {
        parts
            .mask_decoder
            .forward_full_high_res(&features.image_embed, Some((s0, s1)), &pe, sp, de)
    };
    let out = run(&sparse, &dense)?;
    let (masks, iou) = parts.mask_decoder.select(&out, false)?;
    for row in 0..2 {
        let one = run(&sparse.narrow(0, row, 1)?, &dense.narrow(0, row, 1)?)?;
        let (m1, i1) = parts.mask_decoder.select(&one, false)?;
        check(
            &format!("batched row {row} masks"),
            &masks.narrow(0, row, 1)?,
            &m1,
            1e-4,
        )?;
        check(
            &format!("batched row {row} iou"),
            &iou.narrow(0, row, 1)?,
            &i1,
            1e-5,
        )?;
        let o = out.object_score_logits.as_ref().ok_or("object score")?;
        let o1 = one.object_score_logits.as_ref().ok_or("object score")?;
        check(
            &format!("batched row {row} object score"),
            &o.narrow(0, row, 1)?,
            o1,
            1e-5,
        )?;
    }
    Ok(())
}

/// Every SAM 2 decoder tensor, the prompt encoder and the high-resolution inputs get gradients
/// from a loss on all mask tokens, the IoUs and the object score.
#[test]
fn sam2_decoder_every_var_gets_gradient() -> Res<()> {
    let backend = WeightsBackend::new(Source::Random { seed: 5, std: 0.2 }, |_| true);
    let vb = backend.var_builder(&Device::Cpu);
    let cfg = small_decoder();
    let d = 16;
    let pe = PromptEncoder::new(d, 64, 1024, 16, vb.pp("sam_prompt_encoder"))?;
    let dec = MaskDecoder::new_sam2(&cfg, d, vb.pp("sam_mask_decoder"))?;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu);
    let image = randn(&[1, d, 64, 64])?;
    let s0 = Var::from_tensor(&randn(&[1, d / 8, 256, 256])?)?;
    let s1 = Var::from_tensor(&randn(&[1, d / 4, 128, 128])?)?;
    let coords = Tensor::new(
        &[[[100f32, 120.], [700., 610.], [300., 200.]]],
        &Device::Cpu,
    )?;
    let labels = Tensor::new(&[[2i64, 3, 0]], &Device::Cpu)?;
    let mask = randn(&[1, 1, 256, 256])?;
    let (sparse, dense) = pe.forward(Some((&coords, &labels)), None, Some(&mask))?;
    let out = dec.forward_full_high_res(
        &image,
        Some((s0.as_tensor(), s1.as_tensor())),
        &pe.get_dense_pe()?,
        &sparse,
        &dense,
    )?;
    let obj = out.object_score_logits.as_ref().ok_or("object score")?;
    let loss = ((out.masks_all.sqr()?.mean_all()? + out.iou_all.mean_all()?)? + obj.sum_all()?)?;
    let grads = loss.backward()?;
    let mut bad = Vec::new();
    for (name, var) in backend.vars() {
        let norm = match grads.get(var.as_tensor()) {
            Some(g) => g.sqr()?.sum_all()?.to_scalar::<f32>()?,
            None => 0.0,
        };
        // This prompt has no positive click and a mask, so two prompt-encoder rows are unused.
        let unused = name.contains("point_embeddings.1") || name.contains("no_mask_embed");
        let ok = norm > 0.0 && norm.is_finite();
        if !ok && !unused {
            bad.push(name);
        }
    }
    assert!(bad.is_empty(), "vars without gradient: {bad:?}");
    for (name, v) in [("feat_s0", &s0), ("feat_s1", &s1)] {
        let g = grads
            .get(v.as_tensor())
            .ok_or(format!("no gradient for {name}"))?;
        assert!(max_abs(g)? > 0.0, "{name}: zero gradient");
    }
    Ok(())
}

/// Image → `sam2_preprocess` → Hiera encoder → predictor, against the stored box case.
#[test]
fn end_to_end_from_png_box_single() -> Res<()> {
    let sam2 = build_sam2("sam2.1_hiera_reduced.safetensors")?;
    let refs = load_reference(OUTPUTS)?;
    let img = load_rgb(&reference_file("image_300x400.png"))?;
    assert_eq!((img.height, img.width), ORIGINAL);
    let pre = sam2_preprocess(&img.data, img.height, img.width, 1024, &Device::Cpu)?;
    let features = sam2.embed(&pre.input)?;
    check(
        "e2e image_embed",
        &features.image_embed,
        get(&refs, "image_embed")?,
        1e-4,
    )?;
    check(
        "e2e high_res_feat_s0",
        &features.high_res[0],
        get(&refs, "high_res_feat_s0")?,
        1e-4,
    )?;
    check(
        "e2e high_res_feat_s1",
        &features.high_res[1],
        get(&refs, "high_res_feat_s1")?,
        1e-4,
    )?;
    let inputs = load_reference("inputs.safetensors")?;
    let prompts = case_prompts(&inputs, false, true, false)?;
    let pred = sam2.predict(
        &features,
        pre.original_size,
        pre.input_size,
        &prompts,
        false,
    )?;
    let mut worst = Worst::default();
    check_prediction("box_single", &pred, &refs, &mut worst)?;
    Ok(())
}

/// Builds `preset` from zeros and compares its keys and shapes with the image-path part of the
/// official manifest (every key except the video-only ones).
fn check_manifest(preset: &str, file: &str) -> Res<()> {
    let all = manifest_shapes(&manifest(file)?)?;
    let video = all
        .keys()
        .filter(|k| SAM2_VIDEO_KEY_PREFIXES.iter().any(|p| k.starts_with(p)))
        .count();
    let expected: BTreeMap<String, Vec<usize>> = all
        .into_iter()
        .filter(|(k, _)| !SAM2_VIDEO_KEY_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    let cfg = SamConfig::preset(preset)?;
    let backend = WeightsBackend::new(Source::Zeros, |_| false);
    Sam2::new(&cfg, backend.var_builder(&Device::Cpu))?;
    let built = backend.used();
    let diff = diff_key_shapes(&built, &expected);
    assert!(
        diff.is_empty(),
        "{preset} differs from {file}:\n{}",
        diff.join("\n")
    );
    let params: usize = built.values().map(|s| s.iter().product::<usize>()).sum();
    println!(
        "{preset}: {} image-path tensors ({params} elements), {video} video-only skipped",
        built.len()
    );
    Ok(())
}

#[test]
fn sam2_1_presets_match_official_keys() -> Res<()> {
    for (size, file) in [("t", "t"), ("s", "s"), ("b+", "b+"), ("l", "l")] {
        check_manifest(
            &format!("sam2.1-hiera-{size}"),
            &format!("sam2.1_hiera_{file}.json"),
        )?;
    }
    Ok(())
}

/// SAM 2.0 and 2.1 share the image path, so the 2.0 presets match the 2.1 image-path keys.
#[test]
fn sam2_0_presets_build_with_the_same_image_path() -> Res<()> {
    for size in ["t", "s", "b+", "l"] {
        check_manifest(
            &format!("sam2-hiera-{size}"),
            &format!("sam2.1_hiera_{size}.json"),
        )?;
    }
    Ok(())
}
