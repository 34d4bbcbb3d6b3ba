//! `sam2rad eval` end to end on phantoms: a tiny random-init run (default output folder, the
//! box modes, the last checkpoint), the zero-shot box baseline on the reduced SAM fixture, and
//! one-line errors.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_error, assert_ok, fixture, make_run, sam2rad, Res};
use sam2rad_data::phantom::{generate, PhantomClass, PhantomConfig};

fn scratch(name: &str) -> PathBuf {
    common::scratch("evalcli", name)
}

fn phantoms(dir: &Path, classes: Vec<PhantomClass>) -> Res<()> {
    generate(
        &PhantomConfig {
            train: 1,
            test: 3,
            seed: 5,
            classes,
            empty_fraction: 0.3,
            width_range: (64, 90),
            height_range: (64, 80),
        },
        dir,
    )?;
    Ok(())
}

fn summary(dir: &Path) -> Res<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        dir.join("summary.json"),
    )?)?)
}

#[test]
fn eval_a_run_in_every_mode() -> Res<()> {
    let base = scratch("run");
    let (run_dir, data) = (base.join("run"), base.join("data"));
    make_run(&run_dir, 2)?;
    phantoms(&data, vec![PhantomClass::Bone, PhantomClass::Bursa])?;
    let (r, d) = (run_dir.display().to_string(), data.display().to_string());

    let out = sam2rad(&["eval", "--run", &r, "--data", &d]);
    assert_ok(&out);
    let default_out = run_dir.join("eval-Test-auto");
    let json = summary(&default_out)?;
    assert_eq!(json["mode"], "auto");
    assert_eq!(json["num_images"], 3);
    assert_eq!(json["results"]["all"].as_array().map(Vec::len), Some(6));
    assert!(default_out.join("per_case.csv").is_file());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("class 1: Dice") && stdout.contains("class 2: Dice"),
        "{stdout}"
    );
    assert!(stdout.contains(&default_out.join("summary.json").display().to_string()));

    let custom = base.join("boxed");
    let c = custom.display().to_string();
    let out = sam2rad(&[
        "eval",
        "--run",
        &r,
        "--data",
        &d,
        "--mode",
        "auto+box",
        "--out",
        &c,
        "--checkpoint",
        "last",
        "--hd95",
        "--spacing",
        "0.5,0.4",
    ]);
    assert_ok(&out);
    let json = summary(&custom)?;
    assert_eq!(json["mode"], "auto+box");
    assert_eq!(json["surface"]["spacing"][0].as_f64(), Some(0.5));
    assert!(json["model"]
        .as_str()
        .is_some_and(|m| m.contains("last.safetensors")));

    let out = sam2rad(&["eval", "--run", &r, "--data", &d, "--mode", "box"]);
    assert_ok(&out);
    assert!(run_dir.join("eval-Test-box").join("summary.json").is_file());
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn eval_zero_shot_box_baseline() -> Res<()> {
    let base = scratch("zeroshot");
    let data = base.join("data");
    phantoms(&data, vec![PhantomClass::Bone])?;
    let out_dir = base.join("out");
    let out = sam2rad(&[
        "eval",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/sam_vit_reduced.safetensors"),
        "--data",
        &data.display().to_string(),
        "--mode",
        "box",
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert_ok(&out);
    let json = summary(&out_dir)?;
    assert_eq!(json["mode"], "box");
    assert!(json["model"]
        .as_str()
        .is_some_and(|m| m.contains("zero-shot")));
    assert_eq!(json["results"]["mean"]["1"]["false_positives"], 0);
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn eval_errors_are_one_line() -> Res<()> {
    let base = scratch("errors");
    let data = base.join("data");
    phantoms(&data, vec![PhantomClass::Bone, PhantomClass::Bursa])?;
    let d = data.display().to_string();
    let missing = base.join("no-such-run").display().to_string();
    assert_clean_error(
        &sam2rad(&["eval", "--run", &missing, "--data", &d]),
        &missing,
    );

    let run_dir = base.join("run");
    make_run(&run_dir, 2)?;
    let r = run_dir.display().to_string();
    let out = sam2rad(&["eval", "--run", &r, "--data", &d, "--mode", "semi"]);
    assert_clean_error(&out, "auto, box or auto+box");
    let nodata = base.join("no-data").display().to_string();
    assert_clean_error(&sam2rad(&["eval", "--run", &r, "--data", &nodata]), &nodata);

    // A two-class data set evaluated as one class names the mask and the fix.
    let out = sam2rad(&[
        "eval",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/sam_vit_reduced.safetensors"),
        "--data",
        &d,
        "--out",
        &base.join("zs").display().to_string(),
    ]);
    let ds = sam2rad_data::layout::Dataset::open(&data, "Test")?;
    let has_bursa = ds
        .samples
        .iter()
        .map(|s| sam2rad_data::layout::load_sample(s, 2))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .any(|s| s.mask.contains(&2));
    assert!(has_bursa, "the phantoms need a bursa");
    assert_clean_error(&out, "--num-classes");
    let out = sam2rad(&["eval", "--data", &d]);
    assert_clean_error(&out, "--run");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
