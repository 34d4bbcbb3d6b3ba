//! SAM 2.1 image path against the official PyTorch outputs of the reduced Hiera fixture:
//! preprocessing, block schedule, bicubic positional-embedding resize, trunk + neck + conv_s0/s1.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture, stride8};
use sam2rad_models::checkpoint::{Checkpoint, Source, WeightsBackend};
use sam2rad_models::config::{EncoderConfig, SamConfig};
use sam2rad_models::hiera::{resize_bicubic, HieraSchedule};
use sam2rad_models::preprocess_sam2::{
    resize_bilinear_antialias, sam2_preprocess, sam2_preprocess_longest_side,
};
use sam2rad_models::sam2_image_encoder::Sam2ImageEncoder;

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture readable")
}

fn config() -> SamConfig {
    SamConfig::from_json_file(&fixture("configs/sam2.1_hiera_reduced.json")).expect("config")
}

fn image() -> (Vec<u8>, usize, usize) {
    let img = &load("reference/inputs.safetensors")["image_rgb_uint8"];
    let (h, w, _) = img.dims3().expect("HWC");
    (
        img.flatten_all()
            .and_then(|t| t.to_vec1::<u8>())
            .expect("u8 pixels"),
        h,
        w,
    )
}

fn max_abs(t: &Tensor) -> f32 {
    common::max_abs(t).expect("max")
}

fn max_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    common::max_abs_diff(a, b).expect("diff")
}

#[test]
fn preprocess_matches_sam2_transforms() {
    let refs = load("reference/sam2.1_hiera_reduced_outputs.safetensors");
    let (rgb, h, w) = image();
    let pre = sam2_preprocess(&rgb, h, w, 1024, &Device::Cpu).expect("preprocess");
    assert_eq!(pre.input.dims(), &[1, 3, 1024, 1024]);
    assert_eq!(
        (pre.original_size, pre.input_size),
        ((300, 400), (1024, 1024))
    );
    for (name, off) in [
        ("encoder_input_stride8", 0),
        ("encoder_input_stride8_off3", 3),
    ] {
        let err = max_err(&stride8(&pre.input, off).expect("subsample"), &refs[name]);
        println!("{name}: max |Δ| = {err:e}");
        assert!(err <= 1e-5, "{name}: {err}");
    }
}

#[test]
fn longest_side_variant_resizes_then_pads() {
    let (rgb, h, w) = image();
    let square = sam2_preprocess(&rgb, h, w, 1024, &Device::Cpu).expect("square");
    let pre = sam2_preprocess_longest_side(&rgb, h, w, 1024, &Device::Cpu).expect("padded");
    assert_eq!(pre.input_size, (768, 1024));
    let pad = pre.input.i((.., .., 768.., ..)).expect("pad");
    assert_eq!(
        max_abs(&pad),
        0.0,
        "padding must be exact zeros after normalisation"
    );
    let content = pre.input.i((.., .., ..768, ..)).expect("content");
    assert!(max_abs(&content) > 1.0);
    // Both variants resize the width 400 → 1024, and their first output row reads source row 0
    // alone (a single tap at the top border), so that row is identical.
    let a = pre.input.i((.., .., 0, ..)).expect("row");
    let b = square.input.i((.., .., 0, ..)).expect("row");
    assert_eq!(max_err(&a, &b), 0.0);
    assert!(
        sam2_preprocess(&rgb, h, w + 1, 1024, &Device::Cpu).is_err(),
        "size mismatch must be an error"
    );
}

#[test]
fn antialiased_resize_matches_hand_computed_filters() {
    // Downscale 4 → 2: scale 2, triangle support 2. Output 0 is centred at 1.0 and reads inputs
    // 0..3 at distances 0.5, 0.5, 1.5 → weights 0.75, 0.75, 0.25, normalised to 3/7, 3/7, 1/7;
    // output 1 mirrors it. [0, 1, 2, 3] → [5/7, 16/7].
    let down = resize_bilinear_antialias(&[0., 1., 2., 3.], 1, 1, 4, 1, 2).expect("down");
    // Upscale 2 → 4 is plain bilinear with edge taps: [a, ¾a + ¼b, ¼a + ¾b, b].
    let up = resize_bilinear_antialias(&[4., 8.], 1, 2, 1, 4, 1).expect("up");
    for (got, want) in down
        .iter()
        .zip([5. / 7., 16. / 7.])
        .chain(up.iter().zip([4., 5., 7., 8.]))
    {
        assert!((got - want).abs() <= 1e-6, "{got} vs {want}");
    }
}

#[test]
fn bicubic_matches_hand_computed_cubic_convolution() {
    // 2 → 4, align_corners=False: scale 0.5, sources −0.25, 0.25, 0.75, 1.25. With A = −0.75,
    // W(x) = 1.25|x|³ − 2.25|x|² + 1 (|x| ≤ 1) and −0.75|x|³ + 3.75|x|² − 6|x| + 3 (1 < |x| < 2):
    // W(0.25) = 0.87890625, W(0.75) = 0.26171875, W(1.25) = −0.10546875, W(1.75) = −0.03515625.
    // Clamped taps give the weight of input 1 per output: −0.10546875, 0.2265625, 0.7734375,
    // 1.10546875 (input 0 gets 1 minus that). For x = [[0, 1], [2, 3]] = 2·row + col, the output
    // is 2·r[i] + r[j].
    let x = Tensor::new(&[[[[0f32, 1.], [2., 3.]]]], &Device::Cpu).expect("x");
    let y = resize_bicubic(&x, 4, 4).expect("resize");
    // In 256ths (exact in f32): r = [−27, 58, 198, 283] / 256.
    let expected: [i32; 16] = [
        -81, 4, 144, 229, //
        89, 174, 314, 399, //
        369, 454, 594, 679, //
        539, 624, 764, 849,
    ];
    let expected: Vec<f32> = expected.iter().map(|&v| v as f32 / 256.0).collect();
    let expected = Tensor::from_vec(expected, (1, 1, 4, 4), &Device::Cpu).expect("expected");
    let err = max_err(&y, &expected);
    println!("bicubic 2x2 -> 4x4: max |Δ| = {err:e}");
    assert!(err <= 1e-6, "{err}");
}

#[test]
fn block_schedule_matches_official_trunks() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("reference/sam2.1_hiera_reduced.json")).expect("manifest"),
    )
    .expect("json");
    let resolved = &manifest["build"]["resolved"];
    let EncoderConfig::Hiera(h) = &config().encoder else {
        panic!("reduced config is not Hiera")
    };
    let sched = HieraSchedule::new(h).expect("schedule");
    let usizes = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|d| d.as_u64().expect("int") as usize)
            .collect()
    };
    assert_eq!(sched.stage_ends, usizes(&resolved["stage_ends"]));
    assert_eq!(sched.q_pool_blocks, usizes(&resolved["q_pool_blocks"]));
    let blocks = resolved["hiera_blocks"].as_array().expect("blocks");
    assert_eq!(sched.blocks.len(), blocks.len());
    for (ours, theirs) in sched.blocks.iter().zip(blocks) {
        let get = |k: &str| theirs[k].as_u64().expect("int") as usize;
        assert_eq!(
            (
                ours.dim,
                ours.dim_out,
                ours.num_heads,
                ours.window_size,
                ours.q_pool
            ),
            (
                get("dim"),
                get("dim_out"),
                get("num_heads"),
                get("window_size"),
                !theirs["q_stride"].is_null()
            ),
            "block {}",
            get("index")
        );
    }
    // Full-size presets (ARCHITECTURES.md §2.5).
    for (preset, ends, pools, windows) in [
        (
            "sam2.1-hiera-t",
            vec![0, 2, 9, 11],
            vec![1, 3, 10],
            "8 8 4 4 14 0 14 0 14 0 14 7",
        ),
        ("sam2.1-hiera-b+", vec![1, 4, 20, 23], vec![2, 5, 21], ""),
        ("sam2.1-hiera-l", vec![1, 7, 43, 47], vec![2, 8, 44], ""),
    ] {
        let EncoderConfig::Hiera(h) = SamConfig::preset(preset).expect("preset").encoder else {
            panic!("{preset} is not Hiera")
        };
        let sched = HieraSchedule::new(&h).expect("schedule");
        assert_eq!(
            (sched.stage_ends, sched.q_pool_blocks),
            (ends, pools),
            "{preset}"
        );
        if !windows.is_empty() {
            let w: Vec<String> = sched
                .blocks
                .iter()
                .map(|b| b.window_size.to_string())
                .collect();
            assert_eq!(w.join(" "), windows, "{preset}");
        }
    }
}

fn check_encoder(weights: &str) {
    let refs = load("reference/sam2.1_hiera_reduced_outputs.safetensors");
    let ckpt = Arc::new(Checkpoint::load(&fixture(weights)).expect("weights"));
    let backend = WeightsBackend::frozen(ckpt);
    let encoder =
        Sam2ImageEncoder::new(&config(), backend.var_builder(&Device::Cpu)).expect("build");
    // Every image-path key of the checkpoint is read (the rest is prompt encoder, decoder and video).
    let used = backend.used();
    let ckpt = backend.checkpoint().expect("file backend");
    let unused: Vec<&str> = ckpt
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("image_encoder.") || *k == "no_mem_embed")
        .filter(|k| !used.contains_key(*k))
        .collect();
    assert!(unused.is_empty(), "unused image-path keys: {unused:?}");
    let (rgb, h, w) = image();
    let pre = sam2_preprocess(&rgb, h, w, 1024, &Device::Cpu).expect("preprocess");
    let t = Instant::now();
    let f = encoder.forward(&pre.input).expect("forward");
    println!("{weights}: forward {:.2} s", t.elapsed().as_secs_f64());
    let level_shapes: Vec<&[usize]> = f.levels.iter().map(|l| l.dims()).collect();
    assert_eq!(
        level_shapes,
        [&[1, 32, 256, 256][..], &[1, 32, 128, 128], &[1, 32, 64, 64]]
    );
    for (name, ours) in [
        ("image_embed", &f.image_embed),
        ("high_res_feat_s0", &f.high_res[0]),
        ("high_res_feat_s1", &f.high_res[1]),
    ] {
        let r = &refs[name];
        let err = max_err(ours, r);
        let tol = 1e-4 * max_abs(r).max(1.0);
        println!(
            "{weights} {name}: max |Δ| = {err:e} (max |ref| {:.3}, tol {tol:e})",
            max_abs(r)
        );
        assert!(err <= tol, "{name}: {err} > {tol}");
    }
}

#[test]
fn encoder_matches_reference_safetensors() {
    check_encoder("reference/sam2.1_hiera_reduced.safetensors");
}

#[test]
fn encoder_matches_reference_pt() {
    check_encoder("reference/sam2.1_hiera_reduced.pt");
}

#[test]
fn encoder_is_differentiable() {
    // The reduced architecture at 256×256 (stage maps 64/32/16/8: every window still pads) with
    // every weight trainable: gradients must reach all of them through the composite ops.
    let mut cfg = config();
    cfg.image_size = 256;
    let backend = WeightsBackend::new(Source::Random { seed: 3, std: 0.1 }, |_| true);
    let encoder = Sam2ImageEncoder::new(&cfg, backend.var_builder(&Device::Cpu)).expect("build");
    let x = Tensor::randn(0f32, 1., (1, 3, 256, 256), &Device::Cpu).expect("input");
    let f = encoder.forward(&x).expect("forward");
    let mut loss = Tensor::new(0f32, &Device::Cpu).expect("zero");
    for t in [&f.image_embed, &f.high_res[0], &f.high_res[1]] {
        loss = (loss + t.sqr().and_then(|t| t.mean_all()).expect("mean")).expect("sum");
    }
    let grads = loss.backward().expect("backward");
    let vars = backend.vars();
    assert!(vars.len() > 100, "{} trainable tensors", vars.len());
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let m = max_abs(g);
        assert!(m.is_finite() && m > 0.0, "{name}: gradient max |g| = {m}");
    }
    println!("gradients reach all {} trainable tensors", vars.len());
    // The frozen twin takes the fused inference kernels (softmax, GELU); same values.
    let frozen = WeightsBackend::new(Source::Random { seed: 3, std: 0.1 }, |_| false);
    let twin = Sam2ImageEncoder::new(&cfg, frozen.var_builder(&Device::Cpu)).expect("build");
    let g = twin.forward(&x).expect("forward");
    assert!(f.image_embed.track_op() && !g.image_embed.track_op());
    let err = max_err(&f.image_embed, &g.image_embed);
    println!("tracked vs frozen image_embed: max |Δ| = {err:e}");
    assert!(err <= 1e-5 * max_abs(&g.image_embed).max(1.0), "{err}");
}

/// Speed of the full-size Hiera-T image path on random weights (run with `--ignored`).
#[test]
#[ignore]
fn hiera_t_speed() {
    let cfg = SamConfig::preset("sam2.1-hiera-t").expect("preset");
    let backend = WeightsBackend::new(Source::Random { seed: 7, std: 0.02 }, |_| false);
    let encoder = Sam2ImageEncoder::new(&cfg, backend.var_builder(&Device::Cpu)).expect("build");
    let x = Tensor::randn(0f32, 1., (1, 3, 1024, 1024), &Device::Cpu).expect("input");
    for run in 0..3 {
        let t = Instant::now();
        let f = encoder.forward(&x).expect("forward");
        assert_eq!(f.image_embed.dtype(), DType::F32);
        println!("hiera-t forward {run}: {:.2} s", t.elapsed().as_secs_f64());
    }
}
