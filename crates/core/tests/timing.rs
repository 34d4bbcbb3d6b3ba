//! Timing of one training step (PPN + decoder forward, loss, backward) on the `sam-vit-mini`
//! preset, 4 rows, in every decoder mode. Ignored by default; run with
//! `cargo test --release -p sam2rad-core --test timing -- --ignored --nocapture`.

mod common;

use std::time::Instant;

use candle_core::Device;
use common::{noise, rect_targets, Res};
use sam2rad_core::{
    extract, sam2rad_loss, DecoderMode, LossConfig, Phase, RowPrompts, Rows, Sam2Rad, Sam2RadConfig,
};
use sam2rad_models::checkpoint::Source;
use sam2rad_models::config::SamConfig;

#[test]
#[ignore = "timing; run explicitly"]
fn sam_vit_mini_training_step() -> Res<()> {
    let base = SamConfig::preset("sam-vit-mini")?;
    let s = base.image_size;
    for mode in [DecoderMode::Frozen, DecoderMode::Lora, DecoderMode::Full] {
        let cfg = Sam2RadConfig {
            decoder: mode,
            ..Sam2RadConfig::new(base.clone(), 1)
        };
        let model = Sam2Rad::new(
            &cfg,
            Source::Init { seed: 1 },
            Source::Init { seed: 2 },
            &Device::Cpu,
        )?;
        let t = Instant::now();
        let feats = extract(model.base(), &noise(&[4, 3, s, s], 3)?)?;
        let encode = t.elapsed().as_secs_f64();
        let rows = Rows::all(4, 1);
        let q = s / 4;
        let targets = rect_targets(
            s,
            &[
                Some([q, q, 2 * q, 3 * q]),
                None,
                Some([0, 0, q, q]),
                Some([q, 0, 3 * q, q]),
            ],
        )?;
        // (forward, loss, backward) seconds per step.
        let mut times: Vec<[f64; 3]> = Vec::new();
        for step in 0..4u64 {
            let t = Instant::now();
            let out = model.forward(
                &feats,
                &rows,
                &RowPrompts::learned(),
                Phase::Train { seed: step },
            )?;
            let fwd = t.elapsed().as_secs_f64();
            let loss = sam2rad_loss(&out, &targets, &LossConfig::default())?;
            let with_loss = t.elapsed().as_secs_f64();
            let grads = loss.total.backward()?;
            let all = t.elapsed().as_secs_f64();
            assert!(grads.get_ids().count() > 0);
            times.push([fwd, with_loss - fwd, all - with_loss]);
        }
        // Drop the first (warm-up) step; report the median of the rest by total time.
        let mut rest = times[1..].to_vec();
        rest.sort_by(|a, b| a.iter().sum::<f64>().total_cmp(&b.iter().sum::<f64>()));
        let [fwd, loss, bwd] = rest[rest.len() / 2];
        let n_vars: usize = {
            let v = model.trainable_vars();
            v.prompt
                .iter()
                .chain(&v.decoder)
                .map(|(_, v)| v.elem_count())
                .sum()
        };
        println!(
            "sam-vit-mini {mode:?}: encoder {encode:.3}s for 4 images; step: forward {fwd:.3}s + loss {loss:.3}s + backward {bwd:.3}s = {:.3}s ({n_vars} trainable values)",
            fwd + loss + bwd
        );
    }
    Ok(())
}
