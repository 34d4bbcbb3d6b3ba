//! `sam2rad`: Segment-Anything models in one native binary (inspect, embed, segment, bench).

mod cmd_bench;
mod cmd_demo;
mod cmd_embed;
mod cmd_eval;
mod cmd_inspect;
mod cmd_phantom;
mod cmd_predict;
mod cmd_segment;
mod cmd_train;
mod model_args;
mod output;
mod prompt_args;

use clap::{Parser, Subcommand};

/// Command-line interface of sam2rad.
#[derive(Parser, Debug)]
#[command(
    name = "sam2rad",
    version,
    about = "Segment-Anything for ultrasound, in one native binary"
)]
struct Cli {
    /// Worker threads for tensor maths (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The whole pipeline on built-in defaults: phantoms, training, evaluation, overlays.
    Demo(cmd_demo::Args),
    /// Print the family, preset, tensor and parameter count of a weights file.
    Inspect(cmd_inspect::Args),
    /// Run the image encoder and write the embedding the mask decoder receives.
    Embed(cmd_embed::Args),
    /// Segment an image from manual prompts (points, box, mask), like the official predictor.
    Segment(cmd_segment::Args),
    /// Time the image encoder and the prompt encoder + mask decoder.
    Bench(cmd_bench::Args),
    /// Generate ultrasound phantoms with label masks (Layout A: Train/ and Test/ imgs + gts).
    Phantom(cmd_phantom::Args),
    /// Evaluate a trained run (or the zero-shot box baseline of a base model) on a data set split.
    Eval(cmd_eval::Args),
    /// Train a Sam2Rad model (prompt predictor, objectness, decoder adaptation) on a data set.
    Train(cmd_train::Args),
    /// Label maps from a trained run: autonomous, semi-autonomous with prompts, or manual.
    Predict(cmd_predict::Args),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = set_threads(cli.threads) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Inspect(a) => cmd_inspect::run(a),
        Command::Embed(a) => cmd_embed::run(a),
        Command::Segment(a) => cmd_segment::run(a),
        Command::Bench(a) => cmd_bench::run(a),
        Command::Phantom(a) => cmd_phantom::run(a),
        Command::Eval(a) => cmd_eval::run(a),
        Command::Predict(a) => cmd_predict::run(a),
        Command::Train(a) => cmd_train::run(a),
        Command::Demo(a) => cmd_demo::run(a),
    };
    if let Err(e) = result {
        // One line: the chain of causes joined by ": ".
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// candle's CPU kernels read RAYON_NUM_THREADS; rayon's global pool is sized to match.
fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {n} threads: {e}"))?;
    }
    Ok(())
}
