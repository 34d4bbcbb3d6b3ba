//! The embedding cache round-trips features exactly and misses when image, model or view change.

use std::cell::Cell;

use candle_core::{Device, Tensor};
use sam2rad_core::cache::{content_key, model_key, view_key, EmbeddingCache};
use sam2rad_core::Features;

fn features(seed: f32) -> Features {
    let dev = Device::Cpu;
    let t = |c: usize, s: usize, k: f32| {
        Tensor::arange(0f32, (c * s * s) as f32, &dev)
            .and_then(|t| t.affine(k as f64, seed as f64))
            .and_then(|t| t.reshape((1, c, s, s)))
            .expect("tensor")
    };
    Features::sam(t(8, 4, 0.5), t(6, 4, 0.25), t(6, 4, 0.125))
}

#[test]
fn cache_round_trip_and_invalidation() {
    let root = std::env::temp_dir().join(format!("sam2rad-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dev = Device::Cpu;
    let cache = EmbeddingCache::open(&root, &model_key("{\"m\":1}", "w1", "sam")).expect("open");
    let img = content_key(b"image bytes");
    let view = view_key(&(1.5f64, true));
    let calls = Cell::new(0);
    let compute = || {
        calls.set(calls.get() + 1);
        Ok(features(1.0))
    };
    let (a, hit) = cache
        .get_or_compute(&img, &view, &dev, compute)
        .expect("miss");
    assert!(!hit);
    let (b, hit) = cache
        .get_or_compute(&img, &view, &dev, compute)
        .expect("hit");
    assert!(hit);
    assert_eq!(calls.get(), 1, "second call served from disk");
    for (x, y) in a.levels.iter().zip(&b.levels) {
        let d = (x - y)
            .and_then(|d| d.abs())
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f32>());
        assert_eq!(d.expect("diff"), 0.0);
    }
    // Another view, image or model is a different entry.
    assert!(cache
        .load(&img, &view_key(&(1.5f64, false)), &dev)
        .is_none());
    assert!(cache
        .load(&content_key(b"image bytes!"), &view, &dev)
        .is_none());
    let other = EmbeddingCache::open(&root, &model_key("{\"m\":1}", "w2", "sam")).expect("open");
    assert!(other.load(&img, &view, &dev).is_none());
    // A corrupt entry is a miss, not an error.
    for e in std::fs::read_dir(cache.dir()).expect("dir") {
        std::fs::write(e.expect("entry").path(), b"garbage").expect("corrupt");
    }
    assert!(cache.load(&img, &view, &dev).is_none());
    let _ = std::fs::remove_dir_all(&root);
}
