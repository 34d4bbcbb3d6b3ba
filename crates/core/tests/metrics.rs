//! Metric values against hand-computed cases.

use sam2rad_core::metrics::{distance_transform, mean_std, score, summarise, SurfaceOptions};

fn rect(h: usize, w: usize, y0: usize, y1: usize, x0: usize, x1: usize) -> Vec<bool> {
    (0..h * w)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            y >= y0 && y < y1 && x >= x0 && x < x1
        })
        .collect()
}

#[test]
fn dice_and_iou_of_overlapping_rectangles() {
    // 4x4 and 4x4 squares overlapping in a 2x4 strip: inter 8, |A|+|B| 32, union 24.
    let a = rect(10, 10, 0, 4, 0, 4);
    let b = rect(10, 10, 2, 6, 0, 4);
    let m = score(&a, &b, 10, 10, None);
    assert!((m.dice.unwrap() - 0.5).abs() < 1e-12);
    assert!((m.iou.unwrap() - 8.0 / 24.0).abs() < 1e-12);
    assert!(!m.false_positive);
}

#[test]
fn empty_cases_follow_the_protocol() {
    let empty = vec![false; 25];
    let some = rect(5, 5, 1, 3, 1, 3);
    let both_empty = score(&empty, &empty, 5, 5, None);
    assert_eq!(both_empty.dice, None, "not scored");
    let fp = score(&some, &empty, 5, 5, None);
    assert!(fp.false_positive);
    assert_eq!(fp.dice, Some(0.0));
    let missed = score(
        &empty,
        &some,
        5,
        5,
        Some(SurfaceOptions {
            spacing: (1.0, 1.0),
            nsd_tolerance: 1.0,
        }),
    );
    assert_eq!(missed.dice, Some(0.0));
    assert_eq!(missed.hd95, None);
    let s = summarise(1, &[both_empty, fp, missed]);
    assert_eq!((s.scored, s.false_positives, s.true_negatives), (2, 1, 1));
}

#[test]
fn distance_transform_is_euclidean_with_spacing() {
    let mut f = vec![false; 7 * 9];
    f[3 * 9 + 4] = true;
    let d = distance_transform(&f, 7, 9, (2.0, 0.5));
    for y in 0..7 {
        for x in 0..9 {
            let dy = (y as f64 - 3.0) * 2.0;
            let dx = (x as f64 - 4.0) * 0.5;
            assert!(
                (d[y * 9 + x] - (dy * dy + dx * dx).sqrt()).abs() < 1e-9,
                "({y},{x})"
            );
        }
    }
}

#[test]
fn hd95_and_nsd_of_shifted_squares() {
    // Two 6x6 squares shifted by 3 columns: every boundary distance is 0 or 3 (or less).
    let a = rect(20, 20, 5, 11, 5, 11);
    let b = rect(20, 20, 5, 11, 8, 14);
    let m = score(
        &a,
        &b,
        20,
        20,
        Some(SurfaceOptions {
            spacing: (1.0, 1.0),
            nsd_tolerance: 3.0,
        }),
    );
    let hd = m.hd95.unwrap();
    assert!(hd > 2.0 && hd <= 3.0 + 1e-9, "hd95 {hd}");
    assert!(
        (m.nsd.unwrap() - 1.0).abs() < 1e-12,
        "all within tolerance 3"
    );
    let strict = score(
        &a,
        &b,
        20,
        20,
        Some(SurfaceOptions {
            spacing: (1.0, 1.0),
            nsd_tolerance: 0.5,
        }),
    );
    assert!(strict.nsd.unwrap() < 1.0);
    // Identical masks: zero distance, NSD 1.
    let same = score(
        &a,
        &a,
        20,
        20,
        Some(SurfaceOptions {
            spacing: (0.3, 0.3),
            nsd_tolerance: 0.0,
        }),
    );
    assert_eq!(same.hd95, Some(0.0));
    assert_eq!(same.nsd, Some(1.0));
    // Spacing scales distances.
    let mm = score(
        &a,
        &b,
        20,
        20,
        Some(SurfaceOptions {
            spacing: (1.0, 0.5),
            nsd_tolerance: 3.0,
        }),
    );
    assert!((mm.hd95.unwrap() - hd * 0.5).abs() < 1e-9);
}

#[test]
fn mean_std_uses_sample_std() {
    let (m, s, n) = mean_std([Some(1.0), None, Some(3.0)].into_iter()).unwrap();
    assert_eq!((m, n), (2.0, 2));
    assert!((s - 2f64.sqrt()).abs() < 1e-12);
    assert!(mean_std([None, None].into_iter()).is_none());
}
