//! `sam2rad inspect`: what a weights file holds.

use std::path::PathBuf;

use anyhow::Result;
use sam2rad_models::checkpoint::Checkpoint;
use sam2rad_models::detect::{detect, parameter_count};

/// Options of `sam2rad inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weights file (.pth, .pt or .safetensors).
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
}

/// Prints family, preset, tensor count and parameter count.
pub fn run(args: Args) -> Result<()> {
    let ckpt = Checkpoint::load(&args.weights)?;
    let d = detect(&ckpt);
    let params = parameter_count(
        ckpt.tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.elem_count())),
    );
    println!("file:       {}", args.weights.display());
    println!("family:     {}", d.family);
    println!(
        "preset:     {}",
        d.preset.as_deref().unwrap_or("none (custom layout)")
    );
    if let Some(note) = d.note {
        println!("note:       {note}");
    }
    println!("tensors:    {}", ckpt.tensors.len());
    println!("parameters: {}", group_digits(params));
    println!(
        "elements:   {} (parameters + buffers)",
        group_digits(ckpt.num_elements())
    );
    Ok(())
}

/// 93735472 -> "93,735,472".
fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
