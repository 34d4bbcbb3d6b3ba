//! Data set layouts A and B, mask validation errors, subjects, splitting and limiting.

use std::path::{Path, PathBuf};

use sam2rad_data::layout::{
    limit, load_sample, split_by_subject, subject_of, Dataset, LayoutKind, Sample,
};
use sam2rad_data::DataError;

fn grey_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
    img.save(path).unwrap();
}

/// Layout A with two cases in `Train` (one 0/255 binary mask) and one in `Test`.
fn layout_a(root: &Path) {
    grey_png(&root.join("Train/imgs/a_frame001.png"), 8, 6, |x, y| {
        (x * 20 + y) as u8
    });
    grey_png(&root.join("Train/gts/a_frame001.png"), 8, 6, |x, _| {
        (x > 4) as u8 * 2
    });
    grey_png(&root.join("Train/imgs/b.png"), 5, 4, |_, _| 100);
    grey_png(&root.join("Train/gts/b.png"), 5, 4, |x, _| {
        if x < 2 {
            255
        } else {
            0
        }
    });
    grey_png(&root.join("Test/imgs/c.png"), 4, 4, |_, _| 7);
    grey_png(&root.join("Test/gts/c.png"), 4, 4, |_, _| 1);
}

#[test]
fn layout_a_reads_both_splits_any_case() {
    let dir = tempfile::tempdir().unwrap();
    layout_a(dir.path());
    let train = Dataset::open(dir.path(), "train").unwrap();
    assert_eq!(train.layout, LayoutKind::Folders);
    assert_eq!(train.split, "Train");
    let ids: Vec<&str> = train.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a_frame001", "b"]);
    assert_eq!(train.samples[0].subject, "a");
    let a = load_sample(&train.samples[0], 2).unwrap();
    assert_eq!((a.h, a.w), (6, 8));
    assert_eq!(&a.rgb[..6], &[0, 0, 0, 20, 20, 20]);
    assert_eq!(a.mask[5], 2);
    assert_eq!(a.mask[4], 0);
    // 0/255 binary masks map to 0/1.
    let b = load_sample(&train.samples[1], 1).unwrap();
    assert_eq!(&b.mask[..5], &[1, 1, 0, 0, 0]);
    let test = Dataset::open(dir.path(), "Test").unwrap();
    assert_eq!(test.samples.len(), 1);
    assert!(Dataset::open(dir.path(), "val").is_err());
}

#[test]
fn layout_b_reads_nnunet_raw() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("dataset.json"),
        r#"{"channel_names": {"0": "US"}, "labels": {"background": 0, "bone": 1, "bursa": 2},
            "numTraining": 2, "file_ending": ".png"}"#,
    )
    .unwrap();
    grey_png(&root.join("imagesTr/hip01_f003_0000.png"), 6, 5, |_, _| 50);
    grey_png(&root.join("labelsTr/hip01_f003.png"), 6, 5, |x, _| {
        (x % 3) as u8
    });
    grey_png(&root.join("imagesTr/hip02_0000.png"), 6, 5, |_, _| 60);
    grey_png(&root.join("labelsTr/hip02.png"), 6, 5, |_, _| 0);
    grey_png(&root.join("imagesTs/hip03_0000.png"), 6, 5, |_, _| 70);
    let train = Dataset::open(root, "Train").unwrap();
    assert_eq!(train.layout, LayoutKind::NnUnet);
    assert_eq!(
        train.class_names.as_deref(),
        Some(&["bone".to_string(), "bursa".to_string()][..])
    );
    assert_eq!(train.num_classes(), Some(2));
    let ids: Vec<&str> = train.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["hip01_f003", "hip02"]);
    assert_eq!(train.samples[0].subject, "hip01");
    let s = load_sample(&train.samples[0], 2).unwrap();
    assert_eq!(&s.mask[..6], &[0, 1, 2, 0, 1, 2]);
    // Test split without labelsTs: images only; loading for training is a clear error.
    let test = Dataset::open(root, "test").unwrap();
    assert_eq!(test.samples.len(), 1);
    assert_eq!(test.samples[0].mask_path, None);
    let err = load_sample(&test.samples[0], 2).unwrap_err().to_string();
    assert!(err.contains("hip03_0000.png"), "{err}");
    // nnU-Net v1 label map works too.
    std::fs::write(
        root.join("dataset.json"),
        r#"{"labels": {"0": "background", "1": "bone"}, "file_ending": ".png"}"#,
    )
    .unwrap();
    assert_eq!(Dataset::open(root, "Tr").unwrap().num_classes(), Some(1));
    std::fs::write(root.join("dataset.json"), r#"{"file_ending": ".nii.gz"}"#).unwrap();
    let err = Dataset::open(root, "Train").unwrap_err().to_string();
    assert!(
        err.contains("dataset.json") && err.contains(".nii.gz"),
        "{err}"
    );
}

fn sample(root: &Path, image: &str, mask: &str) -> Sample {
    Sample {
        id: "x".into(),
        image_path: root.join(image),
        mask_path: Some(root.join(mask)),
        subject: "x".into(),
    }
}

#[test]
fn wrong_size_mask_names_both_files_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    grey_png(&dir.path().join("img_17.png"), 10, 8, |_, _| 1);
    grey_png(&dir.path().join("mask_17.png"), 9, 8, |_, _| 1);
    let err = load_sample(&sample(dir.path(), "img_17.png", "mask_17.png"), 1).unwrap_err();
    assert!(matches!(err, DataError::SizeMismatch { .. }));
    let msg = err.to_string();
    for part in ["img_17.png", "mask_17.png", "10x8", "9x8"] {
        assert!(msg.contains(part), "`{part}` missing in: {msg}");
    }
}

#[test]
fn unknown_label_names_file_and_value() {
    let dir = tempfile::tempdir().unwrap();
    grey_png(&dir.path().join("i.png"), 4, 4, |_, _| 1);
    grey_png(&dir.path().join("labels_7.png"), 4, 4, |x, _| {
        if x == 3 {
            3
        } else {
            1
        }
    });
    let err = load_sample(&sample(dir.path(), "i.png", "labels_7.png"), 2).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DataError::UnknownLabel { value: 3, .. }),
        "{msg}"
    );
    assert!(msg.contains("labels_7.png") && msg.contains('3'), "{msg}");
    // 255 mixed with other labels is not a binary mask.
    grey_png(&dir.path().join("mixed.png"), 4, 4, |x, _| {
        [0, 1, 255, 0][x as usize]
    });
    let msg = load_sample(&sample(dir.path(), "i.png", "mixed.png"), 2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("mixed.png") && msg.contains("255"), "{msg}");
}

#[test]
fn unreadable_image_and_mask_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken_scan.png"), b"not a png at all").unwrap();
    grey_png(&dir.path().join("m.png"), 4, 4, |_, _| 0);
    let err = load_sample(&sample(dir.path(), "broken_scan.png", "m.png"), 1).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Image { .. }), "{msg}");
    assert!(msg.contains("broken_scan.png"), "{msg}");
    let msg = load_sample(&sample(dir.path(), "missing_image.png", "m.png"), 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing_image.png"), "{msg}");
    grey_png(&dir.path().join("ok.png"), 4, 4, |_, _| 0);
    std::fs::write(dir.path().join("bad_mask.png"), b"garbage").unwrap();
    let msg = load_sample(&sample(dir.path(), "ok.png", "bad_mask.png"), 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("bad_mask.png"), "{msg}");
}

#[test]
fn palette_and_colour_masks() {
    let dir = tempfile::tempdir().unwrap();
    grey_png(&dir.path().join("i.png"), 3, 1, |_, _| 9);
    // A palette PNG keeps its indices as labels.
    let path = dir.path().join("pal.png");
    let file = std::fs::File::create(&path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 3, 1);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(vec![0u8, 0, 0, 255, 0, 0, 0, 255, 0]);
    enc.write_header()
        .unwrap()
        .write_image_data(&[0, 2, 1])
        .unwrap();
    let s = load_sample(&sample(dir.path(), "i.png", "pal.png"), 2).unwrap();
    assert_eq!(s.mask, [0, 2, 1]);
    // A truly coloured mask is rejected by name.
    let rgb = image::RgbImage::from_fn(3, 1, |x, _| image::Rgb([x as u8, 0, 0]));
    rgb.save(dir.path().join("colour.png")).unwrap();
    let msg = load_sample(&sample(dir.path(), "i.png", "colour.png"), 2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("colour.png"), "{msg}");
}

#[test]
fn missing_mask_is_an_error_naming_the_image() {
    let dir = tempfile::tempdir().unwrap();
    layout_a(dir.path());
    grey_png(&dir.path().join("Train/imgs/lonely.png"), 4, 4, |_, _| 0);
    let msg = Dataset::open(dir.path(), "Train").unwrap_err().to_string();
    assert!(msg.contains("lonely.png"), "{msg}");
}

#[test]
fn subject_rule() {
    for (id, subject) in [
        ("subj01_frame003", "subj01"),
        ("subj01-f12", "subj01"),
        ("subj01_slice_7", "subj01"),
        ("subj01.t5", "subj01"),
        ("Patient7_Frame0001", "Patient7"),
        ("case_0000", "case_0000"),
        ("hip12", "hip12"),
        ("subject_0003", "subject_0003"),
        ("frame003", "frame003"),
    ] {
        assert_eq!(subject_of(id), subject, "{id}");
    }
}

fn many_samples() -> Vec<Sample> {
    (0..40)
        .map(|i| {
            let id = format!("s{:02}_frame{:03}", i % 13, i);
            Sample {
                subject: subject_of(&id),
                image_path: PathBuf::from(format!("{id}.png")),
                mask_path: None,
                id,
            }
        })
        .collect()
}

#[test]
fn split_by_subject_never_splits_a_subject() {
    let samples = many_samples();
    for seed in 0..10 {
        let (train, val) = split_by_subject(&samples, 0.25, seed);
        assert_eq!(train.len() + val.len(), samples.len());
        assert!(!val.is_empty() && !train.is_empty());
        for v in &val {
            assert!(
                train.iter().all(|t| t.subject != v.subject),
                "{}",
                v.subject
            );
        }
        let mut subjects: Vec<&str> = val.iter().map(|s| s.subject.as_str()).collect();
        subjects.sort_unstable();
        subjects.dedup();
        assert_eq!(subjects.len(), 3, "round(0.25 * 13) subjects");
        assert_eq!(split_by_subject(&samples, 0.25, seed), (train, val));
    }
    let (a, _) = split_by_subject(&samples, 0.25, 1);
    let (b, _) = split_by_subject(&samples, 0.25, 2);
    assert_ne!(a, b, "the seed changes the split");
    let (train, val) = split_by_subject(&samples, 0.0, 1);
    assert_eq!((train.len(), val.len()), (40, 0));
}

#[test]
fn limit_is_deterministic() {
    let samples = many_samples();
    let a = limit(&samples, 10, 3);
    assert_eq!(a.len(), 10);
    assert_eq!(a, limit(&samples, 10, 3));
    assert_ne!(a, limit(&samples, 10, 4));
    let pos: Vec<usize> = a
        .iter()
        .map(|s| samples.iter().position(|t| t == s).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "original order kept");
    assert_eq!(limit(&samples, 100, 3), samples);
}
