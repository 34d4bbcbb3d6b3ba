//! Augmentation: identity, flips, translation, rotation direction and inversion, nearest
//! labels, parameter ranges and reproducible views.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sam2rad_data::augment::{apply, view_seed, AugmentParams, Crop};

/// A smooth RGB test pattern and a blocky label mask with labels {0, 2, 5}.
fn pattern(h: usize, w: usize) -> (Vec<u8>, Vec<u8>) {
    let mut rgb = Vec::with_capacity(h * w * 3);
    let mut mask = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64 / w as f64, y as f64 / h as f64);
            let v = 128.0 + 100.0 * ((xf * 6.0).sin() * (yf * 4.0).cos());
            rgb.extend([v as u8, (255.0 * xf) as u8, (255.0 * yf) as u8]);
            mask.push(match (x / 7 + y / 5) % 3 {
                0 => 0,
                1 => 2,
                _ => 5,
            });
        }
    }
    (rgb, mask)
}

fn params() -> AugmentParams {
    AugmentParams::identity()
}

#[test]
fn identity_leaves_data_unchanged() {
    let (rgb, mask) = pattern(37, 53);
    assert!(params().is_identity());
    assert_eq!(
        apply(&params(), &rgb, &mask, 37, 53),
        (rgb.clone(), mask.clone())
    );
    // A full-size crop is also exact (the general warp path).
    let full = AugmentParams {
        crop: Some(Crop {
            x0: 0.0,
            y0: 0.0,
            w: 1.0,
            h: 1.0,
        }),
        ..params()
    };
    assert_eq!(apply(&full, &rgb, &mask, 37, 53), (rgb, mask));
}

#[test]
fn flips_mirror_and_twice_is_identity() {
    let (h, w) = (20, 31);
    let (rgb, mask) = pattern(h, w);
    let hflip = AugmentParams {
        hflip: true,
        ..params()
    };
    let (r1, m1) = apply(&hflip, &rgb, &mask, h, w);
    for y in 0..h {
        for x in 0..w {
            assert_eq!(m1[y * w + x], mask[y * w + (w - 1 - x)]);
            assert_eq!(r1[(y * w + x) * 3], rgb[(y * w + w - 1 - x) * 3]);
        }
    }
    assert_eq!(apply(&hflip, &r1, &m1, h, w), (rgb.clone(), mask.clone()));
    let vflip = AugmentParams {
        vflip: true,
        ..params()
    };
    let (r2, m2) = apply(&vflip, &rgb, &mask, h, w);
    assert_eq!(m2[0], mask[(h - 1) * w]);
    assert_eq!(apply(&vflip, &r2, &m2, h, w), (rgb, mask));
}

#[test]
fn translation_shifts_and_fills_with_zero() {
    let (h, w) = (10, 50);
    let (rgb, mask) = pattern(h, w);
    let shift = AugmentParams {
        translate: (0.1, 0.0),
        ..params()
    };
    let (r, m) = apply(&shift, &rgb, &mask, h, w);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            if x < 5 {
                assert_eq!((m[i], r[i * 3]), (0, 0), "outside pixels are 0");
            } else {
                assert_eq!(m[i], mask[i - 5]);
                assert_eq!(r[i * 3], rgb[(i - 5) * 3]);
            }
        }
    }
}

#[test]
fn rotation_is_counter_clockwise_and_invertible() {
    let n = 11;
    let mut mask = vec![0u8; n * n];
    mask[5 * n + 10] = 1; // right middle
    let rgb = vec![0u8; n * n * 3];
    let rot = AugmentParams {
        rotate_deg: 90.0,
        ..params()
    };
    let (_, m) = apply(&rot, &rgb, &mask, n, n);
    assert_eq!(
        m.iter().position(|&v| v == 1),
        Some(5),
        "right middle -> top middle"
    );

    let (h, w) = (64, 80);
    let (rgb, mask) = pattern(h, w);
    for theta in [17.0, -63.0, 90.0] {
        let fwd = AugmentParams {
            rotate_deg: theta,
            ..params()
        };
        let back = AugmentParams {
            rotate_deg: -theta,
            ..params()
        };
        let (r1, m1) = apply(&fwd, &rgb, &mask, h, w);
        let (r2, m2) = apply(&back, &r1, &m1, h, w);
        // Compare a disc around the centre that never leaves the image.
        let (mut err, mut count, mut same) = (0.0, 0usize, 0usize);
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f64 + 0.5 - 40.0, y as f64 + 0.5 - 32.0);
                if dx * dx + dy * dy > 25.0 * 25.0 {
                    continue;
                }
                let i = y * w + x;
                for c in 0..3 {
                    err += (r2[i * 3 + c] as f64 - rgb[i * 3 + c] as f64).abs();
                }
                same += usize::from(m2[i] == mask[i]);
                count += 1;
            }
        }
        let mae = err / (3 * count) as f64;
        assert!(mae < 3.0, "theta {theta}: mean abs error {mae}");
        assert!(
            same as f64 > 0.95 * count as f64,
            "theta {theta}: labels {same}/{count}"
        );
    }
}

#[test]
fn random_views_keep_the_label_set() {
    let (h, w) = (45, 60);
    let (rgb, mask) = pattern(h, w);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..30 {
        let p = AugmentParams::sample(&mut rng);
        let (r, m) = apply(&p, &rgb, &mask, h, w);
        assert_eq!((r.len(), m.len()), (rgb.len(), mask.len()));
        assert!(m.iter().all(|v| [0, 2, 5].contains(v)), "{p:?}");
    }
    // An empty mask passes through.
    let p = AugmentParams::sample(&mut rng);
    assert!(apply(&p, &rgb, &[], h, w).1.is_empty());
}

#[test]
fn sampled_parameters_follow_the_spec() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = 4000;
    let mut counts = [0usize; 5];
    for _ in 0..n {
        let p = AugmentParams::sample(&mut rng);
        counts[0] += usize::from(p.hflip);
        counts[1] += usize::from(p.vflip);
        counts[2] += usize::from(p.translate != (0.0, 0.0));
        counts[3] += usize::from(p.rotate_deg != 0.0);
        counts[4] += usize::from(p.crop.is_some());
        assert!(p.translate.0.abs() <= 0.2 && p.translate.1.abs() <= 0.2);
        assert!(p.rotate_deg.abs() <= 90.0);
        if let Some(c) = p.crop {
            let area = c.w * c.h;
            assert!((0.8 - 1e-9..=1.0 + 1e-9).contains(&area) || c.w == 1.0 || c.h == 1.0);
            assert!(c.x0 >= 0.0 && c.y0 >= 0.0 && c.x0 + c.w <= 1.0 + 1e-12);
            assert!(c.y0 + c.h <= 1.0 + 1e-12);
        }
    }
    for c in counts {
        let f = c as f64 / n as f64;
        assert!((0.45..0.55).contains(&f), "probability {f}");
    }
}

#[test]
fn views_are_reproducible() {
    assert!(AugmentParams::for_view(3, 17, 0).is_identity());
    assert_eq!(
        AugmentParams::for_view(3, 17, 2),
        AugmentParams::for_view(3, 17, 2)
    );
    assert_ne!(
        AugmentParams::for_view(3, 17, 2),
        AugmentParams::for_view(3, 17, 3)
    );
    assert_eq!(view_seed(1, 2, 3), view_seed(1, 2, 3));
    let mut seeds: Vec<u64> = (0..20)
        .flat_map(|i| (0..20).map(move |k| view_seed(9, i, k)))
        .collect();
    seeds.sort_unstable();
    seeds.dedup();
    assert_eq!(seeds.len(), 400);
    assert_ne!(view_seed(1, 2, 3), view_seed(2, 2, 3));
}
