//! Full-size parity through the CLI: official-layout checkpoints (random weights) and the outputs the
//! official PyTorch code computed from them. The files are too large for the repository, so this
//! test is ignored unless `SAM2RAD_ORACLE_DIR` names a folder holding `<name>.pth|.pt` and
//! `<name>_outputs.safetensors` (same tensor names as the reduced fixtures). Run with
//! `SAM2RAD_ORACLE_DIR=... cargo test --release -p sam2rad --test full_size -- --ignored --nocapture`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{fixture_path, load, max_abs, sam2rad};

/// Max abs difference divided by max(1, max |reference|).
fn scaled_err(ours: &Tensor, reference: &Tensor) -> f32 {
    let r = reference.reshape(ours.dims()).expect("same element count");
    let d = max_abs(&(ours - &r).expect("diff"));
    d / max_abs(&r).max(1.0)
}

fn run(args: &[&str]) {
    let out = sam2rad(args);
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "sam2rad {args:?} failed");
}

fn check_model(dir: &Path, preset: &str, name: &str, sam2: bool) {
    let weights = ["pth", "pt"]
        .iter()
        .map(|e| dir.join(format!("{name}.{e}")))
        .find(|p| p.exists())
        .expect("weights file");
    let weights = weights.to_str().expect("utf8");
    let reference = load(&dir.join(format!("{name}_outputs.safetensors")));
    let tmp = std::env::temp_dir().join(format!("sam2rad-full-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let image = fixture_path("reference/image_300x400.png");
    let image = image.to_str().expect("utf8");
    let (emb_tol, low_tol) = if sam2 { (5e-4, 1e-3) } else { (1e-4, 1e-3) };

    let emb_path = tmp.join("emb.safetensors");
    run(&[
        "embed",
        "--model",
        preset,
        "--weights",
        weights,
        "--image",
        image,
        "--out",
        emb_path.to_str().expect("utf8"),
    ]);
    let emb = load(&emb_path);
    let key = if sam2 {
        "image_embed"
    } else {
        "image_embeddings"
    };
    let e = scaled_err(&emb["image_embeddings"], &reference[key]);
    println!("{name} image embedding: scaled max error {e:.2e}");
    assert!(e <= emb_tol, "{name}: embedding error {e}");
    if sam2 {
        for (ours, theirs) in [
            ("high_res_feats_0", "high_res_feat_s0"),
            ("high_res_feats_1", "high_res_feat_s1"),
        ] {
            let e = scaled_err(&emb[ours], &reference[theirs]);
            println!("{name} {ours}: scaled max error {e:.2e}");
            assert!(e <= emb_tol, "{name}: {ours} error {e}");
        }
    }

    let inputs = load(&fixture_path("reference/inputs.safetensors"));
    let mask_path = tmp.join("mask_input.safetensors");
    let mut m = HashMap::new();
    m.insert("mask_input".to_string(), inputs["mask_input"].clone());
    candle_core::safetensors::save(&m, &mask_path).expect("save mask input");
    let mask_arg = mask_path.to_str().expect("utf8").to_string();
    let points = ["--point", "250,120,1", "--point", "121.5,203.25,0"];
    let bbox = ["--box", "60,40,330,260"];
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("points_multimask", [&points[..], &["--multimask"]].concat()),
        ("box_single", bbox.to_vec()),
        (
            "points_box_mask_single",
            [&points[..], &bbox[..], &["--mask-input", &mask_arg]].concat(),
        ),
    ];
    for (case, prompt_args) in cases {
        let logits = tmp.join(format!("{case}.safetensors"));
        let mask = tmp.join(format!("{case}.png"));
        let mut args = vec![
            "segment",
            "--model",
            preset,
            "--weights",
            weights,
            "--image",
            image,
        ];
        args.extend(prompt_args.iter().copied());
        args.extend([
            "--out",
            mask.to_str().expect("utf8"),
            "--logits",
            logits.to_str().expect("utf8"),
        ]);
        run(&args);
        let ours = load(&logits);
        let low = scaled_err(
            &ours["low_res_logits"],
            &reference[&format!("{case}.low_res_logits")],
        );
        let iou = max_abs(
            &(&ours["iou_predictions"] - &reference[&format!("{case}.iou_predictions")])
                .expect("diff"),
        );
        let full = scaled_err(
            &ours["masks_logits"],
            &reference[&format!("{case}.masks_logits")],
        );
        println!("{name} {case}: low-res {low:.2e}, iou {iou:.2e}, masks {full:.2e} (scaled)");
        assert!(
            low <= low_tol && full <= low_tol && iou <= 1e-4,
            "{name} {case}"
        );
        if sam2 {
            let obj = max_abs(
                &(&ours["object_score_logits"]
                    - &reference[&format!("{case}.object_score_logits")])
                    .expect("diff"),
            );
            println!("{name} {case}: object score {obj:.2e}");
            assert!(obj <= 1e-4, "{name} {case}: object score {obj}");
        }
    }
}

fn oracle() -> Option<PathBuf> {
    std::env::var_os("SAM2RAD_ORACLE_DIR").map(PathBuf::from)
}

#[test]
#[ignore = "needs SAM2RAD_ORACLE_DIR with full-size official-layout checkpoints"]
fn sam_vit_b_full_size_parity() {
    check_model(
        &oracle().expect("SAM2RAD_ORACLE_DIR"),
        "sam-vit-b",
        "sam_vit_b",
        false,
    );
}

#[test]
#[ignore = "needs SAM2RAD_ORACLE_DIR with full-size official-layout checkpoints"]
fn mobile_sam_full_size_parity() {
    check_model(
        &oracle().expect("SAM2RAD_ORACLE_DIR"),
        "mobile-sam",
        "mobile_sam",
        false,
    );
}

#[test]
#[ignore = "needs SAM2RAD_ORACLE_DIR with full-size official-layout checkpoints"]
fn sam2_1_hiera_t_full_size_parity() {
    check_model(
        &oracle().expect("SAM2RAD_ORACLE_DIR"),
        "sam2.1-hiera-t",
        "sam2.1_hiera_t",
        true,
    );
}

#[test]
#[ignore = "needs SAM2RAD_ORACLE_DIR with full-size official-layout checkpoints"]
fn sam2_1_hiera_b_plus_full_size_parity() {
    check_model(
        &oracle().expect("SAM2RAD_ORACLE_DIR"),
        "sam2.1-hiera-b+",
        "sam2.1_hiera_b+",
        true,
    );
}
