//! End-to-end checks of the `sam2rad` binary: parity through the CLI, and clear one-line errors
//! (never a panic) on bad input.

mod common;

use common::{assert_clean_error, assert_ok, fixture, fixture_path, load, max_abs_diff, sam2rad};

fn scratch(name: &str) -> std::path::PathBuf {
    common::scratch("cli", name)
}

#[test]
fn inspect_reports_family_and_parameter_count() {
    let out = sam2rad(&[
        "inspect",
        "--weights",
        &fixture("reference/sam_vit_reduced.pt"),
    ]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SAM ViT"), "{text}");
    // The reduced manifest lists every weight; parameters exclude the PE buffer.
    let man: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("reference/sam_vit_reduced.json")).expect("manifest"),
    )
    .expect("json");
    let weights = man["weights"]["tensors"].as_array().expect("tensor list");
    let mut params = 0u64;
    for w in weights {
        let n: u64 = w["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim"))
            .product();
        if !w["key"]
            .as_str()
            .expect("key")
            .ends_with("positional_encoding_gaussian_matrix")
        {
            params += n;
        }
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("parameters:"))
        .expect("parameters line");
    let shown: u64 = line
        .trim_start_matches("parameters:")
        .trim()
        .replace(',', "")
        .parse()
        .expect("number");
    assert_eq!(shown, params);
    let tensors = text
        .lines()
        .find(|l| l.starts_with("tensors:"))
        .expect("tensors line");
    assert!(tensors.ends_with(&weights.len().to_string()), "{tensors}");
}

#[test]
fn embed_matches_pytorch_image_embeddings() {
    let dir = scratch("embed");
    let out_path = dir.join("emb.safetensors");
    let out = sam2rad(&[
        "embed",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/sam_vit_reduced.pt"),
        "--image",
        &fixture("reference/image_300x400.png"),
        "--out",
        out_path.to_str().expect("utf8"),
    ]);
    assert_ok(&out);
    let ours = load(&out_path);
    let reference = load(&fixture_path(
        "reference/sam_vit_reduced_outputs.safetensors",
    ));
    let err = max_abs_diff(&ours["image_embeddings"], &reference["image_embeddings"]);
    println!("embed max abs error {err:e}");
    assert!(err <= 1e-4, "image_embeddings max abs error {err}");
}

#[test]
fn segment_box_matches_pytorch_and_writes_outputs() {
    let dir = scratch("segment");
    let mask = dir.join("mask.png");
    let logits = dir.join("logits.safetensors");
    let overlay = dir.join("overlay.png");
    let out = sam2rad(&[
        "segment",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/sam_vit_reduced.safetensors"),
        "--image",
        &fixture("reference/image_300x400.png"),
        "--box",
        "60,40,330,260",
        "--out",
        mask.to_str().expect("utf8"),
        "--logits",
        logits.to_str().expect("utf8"),
        "--overlay",
        overlay.to_str().expect("utf8"),
    ]);
    assert_ok(&out);
    let ours = load(&logits);
    let reference = load(&fixture_path(
        "reference/sam_vit_reduced_outputs.safetensors",
    ));
    let low = max_abs_diff(
        &ours["low_res_logits"],
        &reference["box_single.low_res_logits"],
    );
    let iou = max_abs_diff(
        &ours["iou_predictions"],
        &reference["box_single.iou_predictions"],
    );
    let full_ref = reference["box_single.masks_logits"]
        .unsqueeze(0)
        .expect("batch dim");
    let full = max_abs_diff(&ours["masks_logits"], &full_ref);
    println!("segment errors: low-res {low:e}, iou {iou:e}, masks {full:e}");
    assert!(
        low <= 1e-3 && iou <= 1e-4 && full <= 1e-3,
        "low {low} iou {iou} masks {full}"
    );

    // The PNG is the thresholded mask, 0/255, wherever the reference is not on the boundary.
    let png = image::open(&mask).expect("mask png").to_luma8();
    assert_eq!((png.width(), png.height()), (400, 300));
    let r = full_ref
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("ref values");
    for (i, p) in png.pixels().enumerate() {
        assert!(p.0[0] == 0 || p.0[0] == 255);
        if r[i].abs() > 1e-3 {
            assert_eq!(p.0[0] == 255, r[i] > 0.0, "pixel {i}");
        }
    }
    let ov = image::open(&overlay).expect("overlay png");
    assert_eq!((ov.width(), ov.height()), (400, 300));
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let dir = scratch("truncated");
    for name in ["sam_vit_reduced.pt", "sam_vit_reduced.safetensors"] {
        let bytes = std::fs::read(fixture_path("reference").join(name)).expect("fixture");
        let cut = dir.join(name);
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
        let out = sam2rad(&["inspect", "--weights", cut.to_str().expect("utf8")]);
        assert_clean_error(&out, name);
    }
}

#[test]
fn other_variant_names_the_first_mismatch() {
    let dir = scratch("variant");
    let out = sam2rad(&[
        "embed",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/mobile_sam_tinyvit_reduced.safetensors"),
        "--image",
        &fixture("reference/image_300x400.png"),
        "--out",
        dir.join("e.safetensors").to_str().expect("utf8"),
    ]);
    assert_clean_error(&out, "missing key `image_encoder.");
    assert!(String::from_utf8_lossy(&out.stderr).contains("MobileSAM"));
    assert!(!dir.join("e.safetensors").exists(), "no partial output");

    // A full-size preset against the reduced file: the first shape mismatch is named.
    let out = sam2rad(&[
        "segment",
        "--model",
        "sam-vit-b",
        "--weights",
        &fixture("reference/sam_vit_reduced.safetensors"),
        "--image",
        &fixture("reference/image_300x400.png"),
        "--box",
        "60,40,330,260",
        "--out",
        dir.join("m.png").to_str().expect("utf8"),
    ]);
    assert_clean_error(&out, "the model expects");
}

#[test]
fn non_image_input_is_a_clear_error() {
    let dir = scratch("notimage");
    let bogus = dir.join("notes.png");
    std::fs::write(&bogus, b"this is not a PNG").expect("write");
    let out = sam2rad(&[
        "segment",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/sam_vit_reduced.safetensors"),
        "--image",
        bogus.to_str().expect("utf8"),
        "--point",
        "10,10,1",
        "--out",
        dir.join("m.png").to_str().expect("utf8"),
    ]);
    assert_clean_error(&out, "notes.png");
    assert!(!dir.join("m.png").exists(), "no partial output");
}

#[test]
fn bad_prompt_values_are_clear_errors() {
    let dir = scratch("prompts");
    for (flag, value, needle) in [
        ("--point", "10,10,7", "label"),
        ("--point", "10,abc,1", "abc"),
        ("--box", "50,50,10,10", "box"),
    ] {
        let out = sam2rad(&[
            "segment",
            "--model-config",
            &fixture("configs/sam_vit_reduced.json"),
            "--weights",
            &fixture("reference/sam_vit_reduced.safetensors"),
            "--image",
            &fixture("reference/image_300x400.png"),
            flag,
            value,
            "--out",
            dir.join("m.png").to_str().expect("utf8"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert!(
            !stderr.contains("panicked") && stderr.contains(needle),
            "{stderr}"
        );
    }
}
