//! Phantom generator: determinism, empty share, classes, written layout, and the
//! intensity-threshold baseline that the phantoms must defeat.

use sam2rad_data::layout::{load_sample, Dataset};
use sam2rad_data::phantom::{
    generate, render, PhantomClass, PhantomConfig, PhantomImage, TEST_INDEX_OFFSET,
};

fn bone_and_bursa() -> PhantomConfig {
    PhantomConfig {
        classes: vec![PhantomClass::Bone, PhantomClass::Bursa],
        ..PhantomConfig::default()
    }
}

fn count(p: &PhantomImage, label: u8) -> usize {
    p.mask.iter().filter(|&&v| v == label).count()
}

#[test]
fn render_is_deterministic_and_seed_dependent() {
    let cfg = bone_and_bursa();
    let a = render(7, 3, &cfg);
    let b = render(7, 3, &cfg);
    assert_eq!(a, b);
    assert_eq!(a.image.len(), a.width * a.height);
    assert_eq!(a.mask.len(), a.width * a.height);
    assert_ne!(render(8, 3, &cfg).image, a.image, "seed must matter");
    assert_ne!(render(7, 4, &cfg).image, a.image, "index must matter");
    assert_ne!(render(7, TEST_INDEX_OFFSET + 3, &cfg).image, a.image);
}

#[test]
fn sizes_stay_in_range_and_vary() {
    let cfg = PhantomConfig::default();
    let mut aspects = Vec::new();
    for i in 0..30 {
        let p = render(1, i, &cfg);
        assert!((320..=640).contains(&p.width), "width {}", p.width);
        assert!((240..=480).contains(&p.height), "height {}", p.height);
        aspects.push(p.width as f64 / p.height as f64);
    }
    let lo = aspects.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = aspects.iter().copied().fold(0.0, f64::max);
    assert!(hi - lo > 0.5, "aspect ratios {lo:.2}..{hi:.2} barely vary");
}

#[test]
fn empty_fraction_is_respected() {
    let cfg = PhantomConfig {
        empty_fraction: 0.25,
        ..PhantomConfig::default()
    };
    let n = 80;
    let empty = (0..n)
        .filter(|&i| {
            let p = render(11, i, &cfg);
            assert!(p.mask.iter().all(|&v| v <= 1), "only bone is labelled");
            let bone = count(&p, 1);
            // A non-empty image has a real bone band, not a few stray pixels.
            assert!(bone == 0 || bone > 500, "image {i}: {bone} bone pixels");
            bone == 0
        })
        .count();
    assert!(
        (19..=21).contains(&empty),
        "{empty} of {n} images are empty, expected about 20"
    );
    let none = PhantomConfig {
        empty_fraction: 0.0,
        ..PhantomConfig::default()
    };
    assert!((0..20).all(|i| count(&render(2, i, &none), 1) > 0));
}

#[test]
fn bursa_class_appears_when_requested() {
    let cfg = PhantomConfig {
        empty_fraction: 0.0,
        ..bone_and_bursa()
    };
    let with_bursa = (0..20)
        .filter(|&i| count(&render(5, i, &cfg), 2) > 0)
        .count();
    assert!(
        with_bursa >= 10,
        "only {with_bursa} of 20 images have a bursa"
    );
    // Bursa alone: it becomes label 1 and bone is not labelled.
    let only = PhantomConfig {
        classes: vec![PhantomClass::Bursa],
        empty_fraction: 0.0,
        ..PhantomConfig::default()
    };
    let p = render(5, 0, &only);
    assert!(p.mask.iter().all(|&v| v <= 1));
    assert_eq!(PhantomClass::parse_list("bone, bursa").unwrap().len(), 2);
    assert!(PhantomClass::parse_list("bone,kidney").is_err());
    assert!(PhantomConfig {
        classes: vec![PhantomClass::Bone, PhantomClass::Bone],
        ..PhantomConfig::default()
    }
    .validate()
    .is_err());
}

/// Dice of "pixel > the image's 97th-percentile grey value" against the bone mask.
fn threshold_dice(p: &PhantomImage) -> f64 {
    let mut sorted = p.image.clone();
    sorted.sort_unstable();
    let t = sorted[(sorted.len() as f64 * 0.97) as usize];
    let (mut inter, mut pred, mut gt) = (0usize, 0usize, 0usize);
    for (&g, &m) in p.image.iter().zip(&p.mask) {
        let (a, b) = (g > t, m == 1);
        inter += usize::from(a && b);
        pred += usize::from(a);
        gt += usize::from(b);
    }
    2.0 * inter as f64 / (pred + gt).max(1) as f64
}

#[test]
fn percentile_threshold_baseline_stays_below_04() {
    let cfg = PhantomConfig {
        empty_fraction: 0.0,
        ..bone_and_bursa()
    };
    let start = std::time::Instant::now();
    let mut pixels = 0usize;
    let dices: Vec<f64> = (0..40)
        .map(|i| {
            let p = render(2024, i, &cfg);
            pixels += p.width * p.height;
            assert!(count(&p, 1) > 0);
            threshold_dice(&p)
        })
        .collect();
    let secs = start.elapsed().as_secs_f64();
    let mean = dices.iter().sum::<f64>() / dices.len() as f64;
    let var = dices.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / dices.len() as f64;
    let max = dices.iter().copied().fold(0.0, f64::max);
    println!(
        "97th-percentile threshold baseline over 40 phantoms with bone: Dice {mean:.3} ± {:.3} \
         (max {max:.3})",
        var.sqrt()
    );
    println!(
        "render speed: {:.1} ms per image, {:.1} ms per 512x384 pixels (wall clock, shared \
         with the other tests)",
        secs * 1e3 / 40.0,
        secs * 1e3 / (pixels as f64 / (512.0 * 384.0))
    );
    assert!(
        mean < 0.4,
        "threshold baseline Dice {mean:.3} is not below 0.4"
    );
}

#[test]
fn generate_writes_layout_a_deterministically() {
    let cfg = PhantomConfig {
        train: 6,
        test: 3,
        seed: 99,
        empty_fraction: 0.34,
        ..bone_and_bursa()
    };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let summary = generate(&cfg, a.path()).unwrap();
    generate(&cfg, b.path()).unwrap();
    assert_eq!((summary.train, summary.test), (6, 3));
    assert_eq!(summary.classes, ["bone", "bursa"]);
    // 0.34 of 6 and of 3 images, each split within one image of its share.
    assert!((2..=5).contains(&summary.empty), "{} empty", summary.empty);
    for split in ["Train", "Test"] {
        for sub in ["imgs", "gts"] {
            let mut names: Vec<String> = std::fs::read_dir(a.path().join(split).join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let n = if split == "Train" { 6 } else { 3 };
            let expected: Vec<String> = (0..n).map(|i| format!("case_{i:04}.png")).collect();
            assert_eq!(names, expected, "{split}/{sub} (no temporary files left)");
            for name in &names {
                let rel = std::path::Path::new(split).join(sub).join(name);
                let x = std::fs::read(a.path().join(&rel)).unwrap();
                let y = std::fs::read(b.path().join(&rel)).unwrap();
                assert!(x == y, "{} differs between two runs", rel.display());
            }
        }
    }
    // Written files decode to exactly what `render` returns.
    let train = Dataset::open(a.path(), "train").unwrap();
    let test = Dataset::open(a.path(), "Test").unwrap();
    assert_eq!((train.samples.len(), test.samples.len()), (6, 3));
    let loaded = load_sample(&test.samples[1], 2).unwrap();
    let direct = render(99, TEST_INDEX_OFFSET + 1, &cfg);
    assert_eq!((loaded.h, loaded.w), (direct.height, direct.width));
    assert_eq!(loaded.mask, direct.mask);
    let grey: Vec<u8> = loaded.rgb.chunks_exact(3).map(|p| p[0]).collect();
    assert_eq!(grey, direct.image);
    // The train and test images are different draws.
    let t0 = load_sample(&train.samples[1], 2).unwrap();
    assert_ne!(t0.rgb, loaded.rgb);
    // Rerunning into the same folder is fine; a folder with other files is refused by name.
    generate(&cfg, a.path()).unwrap();
    std::fs::write(a.path().join("Train/imgs/case_0006.png"), b"x").unwrap();
    let msg = generate(&cfg, a.path()).unwrap_err().to_string();
    assert!(msg.contains("case_0006.png"), "{msg}");
    let meta = std::fs::read_to_string(a.path().join("phantom.json")).unwrap();
    assert!(meta.contains("\"bursa\": 2"), "{meta}");
}
