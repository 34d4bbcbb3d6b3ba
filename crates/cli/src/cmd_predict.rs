//! `sam2rad predict`: label maps from a trained run — autonomous without prompts,
//! semi-autonomous with prompts (learned + user), manual with `--manual`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use sam2rad_core::infer::{overlay_labels, predict_preprocessed, Mode, UserPrompts};
use sam2rad_core::input::preprocess;
use sam2rad_core::run::{self, Which};

use crate::cmd_segment::read_image;
use crate::output::{save_png, save_tensors};
use crate::prompt_args::PromptArgs;

/// Options of `sam2rad predict`. The prompts apply to every class and every image, hence their
/// own help texts.
#[derive(clap::Args, Debug)]
#[command(
    mut_arg("points", |a| a.help(
        "A click `x,y,label` in original pixels (1 positive, 0 negative); repeatable; applies to \
         every class and every image",
    )),
    mut_arg("bbox", |a| a.help(
        "A box `x0,y0,x1,y1` in original pixels (every class, every image)",
    )),
    mut_arg("mask_input", |a| a.help(
        "Mask prompt replacing the learned dense prompt: safetensors low-resolution logits, or a \
         mask image of the input's size (non-zero = object)",
    )),
)]
pub struct Args {
    /// Run folder written by `sam2rad train`.
    #[arg(long, value_name = "RUN")]
    run: PathBuf,
    /// Input images (PNG, JPEG, TIFF, BMP; grey or RGB, 8 or 16 bit).
    #[arg(value_name = "IMAGE", required = true)]
    images: Vec<PathBuf>,
    /// Output folder: <stem>.png label maps (0 background, 1..C classes).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    prompts: PromptArgs,
    /// Manual mode: the given prompts only, learned prompts off.
    #[arg(long)]
    manual: bool,
    /// Also write <stem>_overlay.png (classes blended over the image).
    #[arg(long)]
    overlay: bool,
    /// Also write <stem>_logits.safetensors (class_logits [C,H,W], object_logits [C],
    /// low_res_logits [C,1,h,w], and boxes [C,4] in original pixels when learned prompts ran).
    #[arg(long)]
    logits: bool,
    /// Which checkpoint of the run: best or last.
    #[arg(long, default_value = "best", value_parser = clap::value_parser!(Which))]
    checkpoint: Which,
    /// Replaces the run's base weights path (its identity is still checked).
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
}

/// Predicts every image and writes its outputs.
pub fn run(args: Args) -> Result<()> {
    let dev = Device::Cpu;
    let has_prompt = !args.prompts.is_empty();
    let mode = match (args.manual, has_prompt) {
        (true, true) => Mode::Manual,
        (true, false) => bail!("--manual needs a prompt: --point, --box or --mask-input"),
        (false, true) => Mode::Semi,
        (false, false) => Mode::Auto,
    };
    let mut stems = HashSet::new();
    let mut jobs = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .with_context(|| format!("input {} has no file name", path.display()))?;
        if !stems.insert(stem.clone()) {
            bail!(
                "input {}: another input has the same name `{stem}`; outputs would collide",
                path.display()
            );
        }
        jobs.push((path, stem));
    }
    let run = run::load(&args.run, args.checkpoint, args.weights.as_deref(), &dev)?;
    let model = &run.model;
    let cfg = model.config();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    eprintln!(
        "{} mode, {} class(es), checkpoint {}",
        mode.name(),
        cfg.num_classes,
        run.checkpoint.display()
    );
    for (path, stem) in jobs {
        let img = read_image(path)?;
        let (h, w) = (img.height, img.width);
        let pre = preprocess(&cfg.base, &img.data, h, w, &dev)
            .with_context(|| format!("cannot preprocess {}", path.display()))?;
        let prompts = UserPrompts {
            points: args.prompts.point_tuples(),
            boxes: args.prompts.bbox,
            mask: args.prompts.mask(&pre, cfg.base.image_size, &dev)?,
        };
        let pred = predict_preprocessed(model, &pre, mode, &prompts)
            .with_context(|| format!("cannot predict {}", path.display()))?;
        let label_path = args.out.join(format!("{stem}.png"));
        let png = image::GrayImage::from_raw(w as u32, h as u32, pred.labels.clone())
            .context("label map size")?;
        save_png(&label_path, &png)?;
        if args.overlay {
            let p = args.out.join(format!("{stem}_overlay.png"));
            save_png(&p, &overlay_labels(&img.data, &pred.labels, h, w))?;
        }
        if args.logits {
            let mut t = HashMap::new();
            t.insert("class_logits".to_string(), pred.class_logits.clone());
            t.insert("object_logits".to_string(), pred.object_logits.clone());
            t.insert("low_res_logits".to_string(), pred.low_res_logits.clone());
            let boxes: Option<Vec<[f32; 4]>> = pred.boxes.iter().copied().collect();
            if let Some(b) = boxes {
                let flat: Vec<f32> = b.into_iter().flatten().collect();
                t.insert(
                    "boxes".to_string(),
                    Tensor::from_vec(flat, (cfg.num_classes, 4), &dev)?,
                );
            }
            save_tensors(&args.out.join(format!("{stem}_logits.safetensors")), &t)?;
        }
        let counts: Vec<String> = (1..=cfg.num_classes)
            .map(|c| {
                let n = pred.labels.iter().filter(|&&l| l as usize == c).count();
                format!("class {c}: {n} px")
            })
            .collect();
        println!(
            "{} -> {} ({})",
            path.display(),
            label_path.display(),
            counts.join(", ")
        );
    }
    Ok(())
}
