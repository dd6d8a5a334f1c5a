//! `zlora demo`: the quick start in one command writes every output, and refuses to
//! overwrite without --force.

mod common;

use common::{stderr, stdout, zlora};
use zlora::lora::LoraFile;
use zlora::sample::image::read_png;

#[test]
fn demo_writes_every_output_of_the_quick_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let d = |p: &str| dir.join(p);
    let printed = stdout(&zlora(&["demo", "--out", dir.to_str().unwrap()]));
    assert!(printed.contains("report.html"), "{printed}");

    let (before, _) = read_png(&d("before.png")).unwrap();
    let (after, _) = read_png(&d("after.png")).unwrap();
    assert_eq!((before.width, before.height), (64, 64));
    assert_eq!((after.width, after.height), (64, 64));
    assert_ne!(before.pixels, after.pixels, "the LoRA changed nothing");

    let lora = LoraFile::read_for_dim(d("runs/tiny/lora.safetensors"), 64).unwrap();
    assert!(!lora.modules.is_empty());
    // examples/tiny.toml samples every 20 of 60 steps.
    for step in [20, 40, 60] {
        let grid = d(&format!("runs/tiny/samples/step-{step:06}.png"));
        assert!(read_png(&grid).is_ok(), "{} missing", grid.display());
    }
    assert!(d("runs/tiny/log.jsonl").is_file());
    let report = std::fs::read_to_string(d("reports/tiny/report.html")).unwrap();
    assert!(report.contains("<html"), "not a report");
    for folder in ["models/tiny", "models/tiny-base", "datasets/tiny"] {
        assert!(d(folder).is_dir(), "{folder} missing");
    }

    let again = zlora(&["demo", "--out", dir.to_str().unwrap()]);
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("--force"), "{said}");

    // --force starts over in a folder the demo made...
    stderr(&zlora(&["demo", "--out", dir.to_str().unwrap(), "--force"]));
    assert!(d("reports/tiny/report.html").is_file());
    // ...and never in one it did not.
    let other = tmp.path().join("mine");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep").unwrap();
    let refused = zlora(&["demo", "--out", other.to_str().unwrap(), "--force"]);
    assert!(!refused.status.success());
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "keep"
    );
}
