//! Prompt encoder + mask decoder + postprocessing against the official SAM outputs stored in
//! `fixtures/reference` (reduced SAM ViT, width 32), fed with the stored image embedding.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{
    check_elem_count, check_no_flips, fixture, get, load_reference, max_abs_diff, reference_file,
    Res,
};
use sam2rad_models::checkpoint::{Checkpoint, WeightsBackend};
use sam2rad_models::config::{DecoderConfig, SamConfig};
use sam2rad_models::mask_decoder::MaskDecoder;
use sam2rad_models::postprocess::{apply_boxes, apply_coords, postprocess_masks};
use sam2rad_models::prompt_encoder::PromptEncoder;
use sam2rad_models::sam::{Prompts, Sam};

const ORIGINAL: (usize, usize) = (300, 400);
const INPUT: (usize, usize) = (768, 1024);

fn check(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) -> Res<f32> {
    check_elem_count(what, ours, reference)?;
    let err = max_abs_diff(ours, &reference.reshape(ours.shape())?)?;
    println!("{what:<48} max |Δ| = {err:.3e}");
    if err > tol {
        return Err(format!("{what}: max |Δ| {err:e} > {tol:e}").into());
    }
    Ok(err)
}

struct Model {
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
}

fn build(weights: &str) -> Res<Model> {
    let ckpt = Arc::new(Checkpoint::load(&reference_file(weights))?);
    let backend = WeightsBackend::frozen(ckpt);
    let vb = backend.var_builder(&Device::Cpu);
    Ok(Model {
        prompt_encoder: PromptEncoder::new(32, 64, 1024, 16, vb.pp("prompt_encoder"))?,
        mask_decoder: MaskDecoder::new(&DecoderConfig::default(), 32, vb.pp("mask_decoder"))?,
    })
}

/// The fixture prompts mapped to the model frame: (coords [1,N,2], labels [1,N]), box [1,4].
fn prompts(inputs: &HashMap<String, Tensor>) -> Res<((Tensor, Tensor), Tensor)> {
    let pts: Vec<Vec<f32>> = get(inputs, "points_xy")?.to_vec2()?;
    let pts: Vec<[f32; 2]> = pts.iter().map(|p| [p[0], p[1]]).collect();
    let coords: Vec<f32> = apply_coords(&pts, ORIGINAL, INPUT)
        .into_iter()
        .flatten()
        .collect();
    let n = pts.len();
    let coords = Tensor::from_vec(coords, (1, n, 2), &Device::Cpu)?;
    let labels = get(inputs, "labels")?
        .to_dtype(DType::I64)?
        .reshape((1, n))?;
    let b: Vec<f32> = get(inputs, "box_xyxy")?.to_vec1()?;
    let b = apply_boxes(&[[b[0], b[1], b[2], b[3]]], ORIGINAL, INPUT);
    let boxes = Tensor::from_vec(b[0].to_vec(), (1, 4), &Device::Cpu)?;
    Ok(((coords, labels), boxes))
}

fn run_cases(weights: &str) -> Res<()> {
    println!("== weights {weights}");
    let inputs = load_reference("inputs.safetensors")?;
    let refs = load_reference("sam_vit_reduced_outputs.safetensors")?;
    let model = build(weights)?;
    let embedding = get(&refs, "image_embeddings")?;
    let dense_pe = model.prompt_encoder.get_dense_pe()?;
    check("dense_pe", &dense_pe, get(&refs, "dense_pe")?, 1e-5)?;

    let ((coords, labels), boxes) = prompts(&inputs)?;
    let mask_input = get(&inputs, "mask_input")?.reshape((1, 1, 256, 256))?;
    let mut worst = [0f32; 3];
    for (case, use_points, use_box, use_mask, multimask) in [
        ("points_multimask", true, false, false, true),
        ("box_single", false, true, false, false),
        ("points_box_mask_single", true, true, true, false),
    ] {
        let r = |t: &str| get(&refs, &format!("{case}.{t}"));
        if use_points {
            check(
                &format!("{case}.model_point_coords"),
                &coords,
                r("model_point_coords")?,
                0.0,
            )?;
            let ref_labels = r("model_point_labels")?
                .to_dtype(DType::I64)?
                .flatten_all()?;
            if labels.flatten_all()?.to_vec1::<i64>()? != ref_labels.to_vec1::<i64>()? {
                return Err(format!("{case}: point labels differ").into());
            }
        }
        if use_box {
            check(
                &format!("{case}.model_boxes"),
                &boxes,
                r("model_boxes")?,
                0.0,
            )?;
        }
        let points = use_points.then_some((&coords, &labels));
        let (sparse, dense) = model.prompt_encoder.forward(
            points,
            use_box.then_some(&boxes),
            use_mask.then_some(&mask_input),
        )?;
        check(
            &format!("{case}.sparse_embeddings"),
            &sparse,
            r("sparse_embeddings")?,
            1e-5,
        )?;
        if use_mask {
            check(
                &format!("{case}.dense_embeddings"),
                &dense,
                r("dense_embeddings")?,
                1e-5,
            )?;
        }
        let (low_res, iou) = model
            .mask_decoder
            .forward(embedding, &dense_pe, &sparse, &dense, multimask)?;
        worst[0] = worst[0].max(check(
            &format!("{case}.low_res_logits"),
            &low_res,
            r("low_res_logits")?,
            1e-3,
        )?);
        worst[1] = worst[1].max(check(
            &format!("{case}.iou_predictions"),
            &iou,
            r("iou_predictions")?,
            1e-4,
        )?);

        let masks = postprocess_masks(&low_res, INPUT, ORIGINAL, 1024)?;
        let reference = r("masks_logits")?;
        worst[2] = worst[2].max(check(
            &format!("{case}.masks_logits"),
            &masks,
            reference,
            1e-3,
        )?);
        check_no_flips(case, &masks, reference)?;
    }
    println!(
        "worst over cases: low_res {:.3e}, iou {:.3e}, masks {:.3e}",
        worst[0], worst[1], worst[2]
    );
    Ok(())
}

#[test]
fn decoder_matches_reference_safetensors() -> Res<()> {
    run_cases("sam_vit_reduced.safetensors")
}

#[test]
fn decoder_matches_reference_pt() -> Res<()> {
    run_cases("sam_vit_reduced.pt")
}

/// Two different prompts in one batch give the same rows as two single-prompt calls, with the
/// image embedding either shared (batch 1) or repeated per prompt row.
#[test]
fn batched_prompts_match_single_rows() -> Res<()> {
    let inputs = load_reference("inputs.safetensors")?;
    let refs = load_reference("sam_vit_reduced_outputs.safetensors")?;
    let model = build("sam_vit_reduced.safetensors")?;
    let embedding = get(&refs, "image_embeddings")?;
    let dense_pe = model.prompt_encoder.get_dense_pe()?;
    let ((coords, labels), boxes) = prompts(&inputs)?;
    let mask = get(&inputs, "mask_input")?.reshape((1, 1, 256, 256))?;

    // Row 1: swapped clicks, a shifted box and a negated mask.
    let coords2 = Tensor::cat(&[&coords, &coords.flip(&[1])?], 0)?;
    let labels2 = Tensor::cat(&[&labels, &labels.flip(&[1])?], 0)?;
    // The batch passes float labels, the single rows integer ones: both must mean the same.
    let labels2_f32 = labels2.to_dtype(DType::F32)?;
    let boxes2 = Tensor::cat(&[&boxes, &(&boxes + 40.0)?], 0)?;
    let mask2 = Tensor::cat(&[&mask, &mask.neg()?], 0)?;
    let (sparse, dense) = model.prompt_encoder.forward(
        Some((&coords2, &labels2_f32)),
        Some(&boxes2),
        Some(&mask2),
    )?;
    let embedding2 = Tensor::cat(&[embedding, embedding], 0)?;
    for image in [embedding, &embedding2] {
        let (masks, iou) = model
            .mask_decoder
            .forward(image, &dense_pe, &sparse, &dense, true)?;
        for row in 0..2 {
            let pick = |t: &Tensor| t.narrow(0, row, 1);
            let (s1, d1) = model.prompt_encoder.forward(
                Some((&pick(&coords2)?, &pick(&labels2)?)),
                Some(&pick(&boxes2)?),
                Some(&pick(&mask2)?),
            )?;
            let (m1, i1) = model
                .mask_decoder
                .forward(embedding, &dense_pe, &s1, &d1, true)?;
            check(
                &format!("batched row {row} masks"),
                &pick(&masks)?,
                &m1,
                1e-4,
            )?;
            check(&format!("batched row {row} iou"), &pick(&iou)?, &i1, 1e-5)?;
        }
    }
    Ok(())
}

/// `Sam::predict` (original-pixel prompts, full model built from the checkpoint with no key left
/// over) reproduces `SamPredictor.predict(..., return_logits=True)` on the stored embedding.
#[test]
fn predictor_matches_reference() -> Res<()> {
    let cfg = SamConfig::from_json_file(&fixture("configs/sam_vit_reduced.json"))?;
    let backend = WeightsBackend::frozen(Arc::new(Checkpoint::load(&reference_file(
        "sam_vit_reduced.safetensors",
    ))?));
    let sam = Sam::new(&cfg, backend.var_builder(&Device::Cpu))?;
    backend.check_unexpected(&[])?;

    let inputs = load_reference("inputs.safetensors")?;
    let refs = load_reference("sam_vit_reduced_outputs.safetensors")?;
    let embedding = get(&refs, "image_embeddings")?;
    let pts: Vec<Vec<f32>> = get(&inputs, "points_xy")?.to_vec2()?;
    let labels: Vec<i64> = get(&inputs, "labels")?.to_dtype(DType::I64)?.to_vec1()?;
    let points: Vec<(f32, f32, i64)> = pts
        .iter()
        .zip(&labels)
        .map(|(p, &l)| (p[0], p[1], l))
        .collect();
    let b: Vec<f32> = get(&inputs, "box_xyxy")?.to_vec1()?;
    let mask = get(&inputs, "mask_input")?.clone();
    for (case, use_points, use_box, use_mask, multimask) in [
        ("points_multimask", true, false, false, true),
        ("box_single", false, true, false, false),
        ("points_box_mask_single", true, true, true, false),
    ] {
        let prompts = Prompts {
            points: if use_points {
                points.clone()
            } else {
                Vec::new()
            },
            boxes: use_box.then_some([b[0], b[1], b[2], b[3]]),
            mask_input: use_mask.then(|| mask.clone()),
        };
        let pred = sam.predict(embedding, ORIGINAL, INPUT, &prompts, multimask)?;
        let r = |t: &str| get(&refs, &format!("{case}.{t}"));
        check(
            &format!("predict {case}.low_res_logits"),
            &pred.low_res_logits,
            r("low_res_logits")?,
            1e-3,
        )?;
        check(
            &format!("predict {case}.iou_predictions"),
            &pred.iou_predictions,
            r("iou_predictions")?,
            1e-4,
        )?;
        check(
            &format!("predict {case}.masks_logits"),
            &pred.masks_logits,
            r("masks_logits")?,
            1e-3,
        )?;
    }
    Ok(())
}
