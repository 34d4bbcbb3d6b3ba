//! Preprocessing parity with the official SAM pipeline (Pillow bilinear resize, normalisation,
//! padding) on the reference fixtures.

mod common;

use candle_core::{Device, Tensor};
use common::{load_reference, max_abs, max_abs_diff, reference_file, stride8, Res};
use sam2rad_models::preprocess::{
    load_rgb, longest_side_size, medsam_preprocess, resize_pillow_bilinear, sam_preprocess,
};

fn reference(name: &str) -> Res<Tensor> {
    let mut all = load_reference("sam_vit_reduced_outputs.safetensors")?;
    Ok(all
        .remove(name)
        .ok_or(format!("no `{name}` in the outputs file"))?)
}

#[test]
fn longest_side_matches_resize_longest_side() {
    assert_eq!(longest_side_size(300, 400, 1024), (768, 1024));
    assert_eq!(longest_side_size(400, 300, 1024), (1024, 768));
    // int(h * scale + 0.5) with scale = 1024 / 3000 in f64.
    assert_eq!(longest_side_size(1001, 3000, 1024), (342, 1024));
}

#[test]
fn pillow_upscale_is_byte_exact() -> Res<()> {
    let img = load_rgb(&reference_file("image_300x400.png"))?;
    assert_eq!((img.height, img.width), (300, 400));
    let (nh, nw) = longest_side_size(img.height, img.width, 1024);
    let ours = resize_pillow_bilinear(&img.data, img.height, img.width, 3, nh, nw);
    let want = load_rgb(&reference_file("sam_resized_768x1024.png"))?;
    assert_eq!((want.height, want.width), (768, 1024));
    let diff = ours.iter().zip(&want.data).filter(|(a, b)| a != b).count();
    println!(
        "pillow resize 300x400 -> 768x1024: {diff} of {} bytes differ",
        ours.len()
    );
    assert_eq!(diff, 0);

    // The stored stride-8 subsample of the resized uint8 image.
    let sub = reference("input_resized_uint8_stride8")?.to_vec3::<u8>()?;
    for (y, row) in sub.iter().enumerate() {
        for (x, px) in row.iter().enumerate() {
            let o = ((y * 8) * nw + x * 8) * 3;
            assert_eq!(
                &ours[o..o + 3],
                px.as_slice(),
                "pixel ({y}, {x}) of the stride-8 grid"
            );
        }
    }
    Ok(())
}

#[test]
fn sam_input_matches_encoder_input() -> Res<()> {
    let img = load_rgb(&reference_file("image_300x400.png"))?;
    let pre = sam_preprocess(&img.data, img.height, img.width, 1024, &Device::Cpu)?;
    assert_eq!(pre.input.dims(), &[1, 3, 1024, 1024]);
    assert_eq!(pre.original_size, (300, 400));
    assert_eq!(pre.input_size, (768, 1024));
    let ours = stride8(&pre.input, 0)?;
    let want = reference("encoder_input_stride8")?;
    let err = max_abs_diff(&ours, &want)?;
    println!("encoder_input_stride8 max abs error: {err:e}");
    assert!(err <= 1e-5);
    // Rows below the resized image are zero padding.
    let pad = max_abs(&pre.input.narrow(2, 768, 256)?)?;
    assert_eq!(pad, 0.0);
    Ok(())
}

#[test]
fn pillow_downscale_preserves_mean() -> Res<()> {
    let img = load_rgb(&reference_file("image_300x400.png"))?;
    let small = resize_pillow_bilinear(&img.data, 300, 400, 3, 75, 100);
    assert_eq!(small.len(), 75 * 100 * 3);
    for c in 0..3 {
        let mean = |v: &[u8]| {
            let s: Vec<f64> = v.iter().skip(c).step_by(3).map(|&x| x as f64).collect();
            s.iter().sum::<f64>() / s.len() as f64
        };
        let (a, b) = (mean(&img.data), mean(&small));
        println!("channel {c}: mean {a:.3} -> {b:.3}");
        assert!((a - b).abs() <= 1.0, "channel {c}: mean {a} vs {b}");
    }
    // A constant image stays constant under any rescale (coefficients sum to one).
    let flat = vec![77u8; 13 * 17];
    assert!(resize_pillow_bilinear(&flat, 13, 17, 1, 5, 40)
        .iter()
        .all(|&v| v == 77));
    Ok(())
}

#[test]
fn medsam_input_is_square_and_unit_range() -> Res<()> {
    let img = load_rgb(&reference_file("image_300x400.png"))?;
    let pre = medsam_preprocess(&img.data, img.height, img.width, 256, &Device::Cpu)?;
    assert_eq!(pre.input.dims(), &[1, 3, 256, 256]);
    assert_eq!(pre.input_size, (256, 256));
    let v = pre.input.flatten_all()?;
    assert_eq!(v.min(0)?.to_scalar::<f32>()?, 0.0);
    assert_eq!(v.max(0)?.to_scalar::<f32>()?, 1.0);
    Ok(())
}

#[test]
fn bad_inputs_give_clear_errors() {
    let err = load_rgb(&reference_file("README.md"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("README.md") && err.contains("not a readable image"),
        "{err}"
    );
    let err = sam_preprocess(&[0u8; 10], 2, 2, 64, &Device::Cpu)
        .err()
        .map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("2x2x3"));
}

#[test]
fn sixteen_bit_grey_is_min_max_scaled_to_rgb() -> Res<()> {
    let (w, h) = (5u32, 3u32);
    // A scan using a small part of the 16-bit range, as CT/MR exports often do.
    let px: Vec<u16> = (0..w * h).map(|i| 1000 + 100 * i as u16).collect();
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(w, h, px).ok_or("buffer")?;
    let path = std::env::temp_dir().join(format!("sam2rad_grey16_{}.png", std::process::id()));
    img.save(&path)?;
    let rgb = load_rgb(&path);
    std::fs::remove_file(&path)?;
    let rgb = rgb?;
    assert_eq!((rgb.height, rgb.width), (3, 5));
    assert_eq!(&rgb.data[..3], &[0, 0, 0]);
    assert_eq!(&rgb.data[rgb.data.len() - 3..], &[255, 255, 255]);
    assert!(rgb.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    Ok(())
}
