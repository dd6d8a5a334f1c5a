//! `zlora caption` end to end on the tiny Qwen3-VL fixture (scripts/make_caption_fixtures.py):
//! the caption written equals transformers' greedy answer, existing captions are kept unless
//! asked, the trigger goes first, a dry run writes nothing, and a bad model folder is one
//! line of error.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{stderr, stdout, zlora};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/caption")
}

fn model() -> String {
    fixtures().join("model").to_str().unwrap().to_string()
}

/// A dataset folder holding the two fixture images.
fn dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["wide.png", "tall.png"] {
        fs::copy(fixtures().join(name), dir.path().join(name)).unwrap();
    }
    dir
}

fn caption(dir: &Path, extra: &[&str]) -> Output {
    let model = model();
    let mut args = vec!["caption", dir.to_str().unwrap(), "--model", &model];
    args.extend_from_slice(extra);
    zlora(&args)
}

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name)).unwrap()
}

/// transformers' decoded greedy answer for the fixture prompt, from the fixture's metadata.
fn reference_text(name: &str) -> (String, String) {
    let bytes = fs::read(fixtures().join(format!("{name}.safetensors"))).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    (meta["prompt"].clone(), meta["text"].trim().to_string())
}

#[test]
fn writes_transformers_greedy_caption_beside_each_image() {
    let dir = dataset();
    let (prompt, wide) = reference_text("wide");
    let (_, tall) = reference_text("tall");
    let err = stderr(&caption(
        dir.path(),
        &["--prompt", &prompt, "--max-tokens", "30"],
    ));
    assert!(err.contains("captioned 2, skipped 0, failed 0"), "{err}");
    assert_eq!(read(dir.path(), "wide.txt"), wide);
    assert_eq!(read(dir.path(), "tall.txt"), tall);
}

#[test]
fn existing_captions_are_refused_kept_or_overwritten_as_asked() {
    let dir = dataset();
    fs::write(dir.path().join("wide.txt"), "mine").unwrap();
    let refused = caption(dir.path(), &["--max-tokens", "4"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("already have a caption") && err.contains("--skip-existing"),
        "{err}"
    );
    assert!(
        !dir.path().join("tall.txt").exists(),
        "nothing is written after a refusal"
    );

    let err = stderr(&caption(
        dir.path(),
        &["--skip-existing", "--max-tokens", "4"],
    ));
    assert!(err.contains("captioned 1, skipped 1, failed 0"), "{err}");
    assert_eq!(read(dir.path(), "wide.txt"), "mine");
    assert!(!read(dir.path(), "tall.txt").is_empty());

    stderr(&caption(dir.path(), &["--force", "--max-tokens", "4"]));
    assert_ne!(read(dir.path(), "wide.txt"), "mine");
}

/// The JSON lines of a run's stdout.
fn events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

#[test]
fn events_json_reports_each_image_then_done_or_failed() {
    let dir = dataset();
    fs::write(dir.path().join("wide.txt"), "mine").unwrap();
    let refused = caption(dir.path(), &["--events", "json"]);
    assert!(!refused.status.success());
    let lines = events(&refused);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event"], "failed");
    assert!(
        lines[0]["error"]
            .as_str()
            .unwrap()
            .contains("already have a caption"),
        "{lines:?}"
    );

    let out = caption(
        dir.path(),
        &["--skip-existing", "--max-tokens", "4", "--events", "json"],
    );
    let err = stderr(&out);
    assert!(err.contains("captioned 1, skipped 1, failed 0"), "{err}");
    assert_eq!(
        events(&out),
        [
            serde_json::json!({"event": "image", "done": 1, "total": 2}),
            serde_json::json!({"event": "image", "done": 2, "total": 2}),
            serde_json::json!({"event": "done", "captioned": 1, "skipped": 1, "too_long": []}),
        ]
    );

    // An image that cannot be decoded fails alone; the run ends with `failed` naming it.
    fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
    let out = caption(
        dir.path(),
        &["--skip-existing", "--max-tokens", "4", "--events", "json"],
    );
    assert!(!out.status.success());
    let lines = events(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(
        lines[2],
        serde_json::json!({"event": "image", "done": 3, "total": 3})
    );
    assert_eq!(lines[3]["event"], "failed");
    let error = lines[3]["error"].as_str().unwrap();
    assert!(
        error.starts_with("1 image(s) could not be captioned: ") && error.contains("broken.png"),
        "{error}"
    );
}

#[test]
fn the_trigger_goes_first_and_trigger_only_writes_just_it() {
    let dir = dataset();
    stderr(&caption(
        dir.path(),
        &[
            "--trigger",
            "zkchar",
            "--style",
            "tags",
            "--max-tokens",
            "6",
        ],
    ));
    for name in ["wide.txt", "tall.txt"] {
        let text = read(dir.path(), name);
        assert!(
            text.starts_with("zkchar, ") && text.len() > 8,
            "{name}: {text:?}"
        );
    }
    let args = ["--style", "trigger-only", "--trigger", "zkchar", "--force"];
    let err = stderr(&caption(dir.path(), &args));
    assert!(
        !err.contains("device:"),
        "trigger-only loads no model: {err}"
    );
    assert_eq!(read(dir.path(), "wide.txt"), "zkchar");
}

#[test]
fn the_review_sheet_shows_every_image_and_is_not_overwritten() {
    let dir = dataset();
    fs::write(dir.path().join("wide.txt"), "mine").unwrap();
    let out = tempfile::tempdir().unwrap();
    let sheet = out.path().join("sheet.png");
    let args = [
        "--skip-existing",
        "--max-tokens",
        "4",
        "--sheet",
        sheet.to_str().unwrap(),
    ];
    stderr(&caption(dir.path(), &args));
    let (img, _) = zlora::sample::image::read_png(&sheet).unwrap();
    // Two rows of at least a 192-px thumbnail each, with the thumbnails' pixels in them.
    assert!(img.height >= 2 * 192, "{}×{}", img.width, img.height);
    let non_white = img
        .pixels
        .chunks(3)
        .filter(|p| p != &[255, 255, 255])
        .count();
    assert!(non_white > 2 * 100 * 100, "{non_white} drawn pixels");
    let again = caption(dir.path(), &args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force to replace the review sheet"));
}

#[test]
fn the_html_sheet_embeds_every_image_escapes_captions_and_is_not_overwritten() {
    let dir = dataset();
    let planted = "<script>alert(1)</script> & more";
    fs::write(dir.path().join("wide.txt"), planted).unwrap();
    let out = tempfile::tempdir().unwrap();
    let sheet = out.path().join("review.html");
    let args = [
        "--skip-existing",
        "--max-tokens",
        "4",
        "--sheet",
        sheet.to_str().unwrap(),
    ];
    stderr(&caption(dir.path(), &args));
    let page = fs::read_to_string(&sheet).unwrap();
    assert!(!page.contains("<script"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"));
    let tall = read(dir.path(), "tall.txt");
    assert!(page.contains(&zlora::html::escape(&tall)), "{page}");
    assert_eq!(page.matches("src=\"data:image/png;base64,").count(), 2);

    let again = caption(dir.path(), &args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force to replace the review sheet"));
    assert_eq!(fs::read_to_string(&sheet).unwrap(), page);
}

#[test]
fn a_dry_run_prints_captions_and_writes_nothing() {
    let dir = dataset();
    let out = caption(
        dir.path(),
        &["--dry-run", "--trigger", "zk", "--max-tokens", "5"],
    );
    let printed = stdout(&out);
    assert_eq!(
        printed.lines().filter(|l| l.contains(".txt: zk, ")).count(),
        2,
        "{printed}"
    );
    let files: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 2, "only the two images remain");
}

#[test]
fn sampling_is_seeded_and_differs_from_greedy() {
    let dir = dataset();
    let run = |extra: &[&str]| {
        let mut args = vec!["--dry-run", "--max-tokens", "12"];
        args.extend_from_slice(extra);
        stdout(&caption(dir.path(), &args))
    };
    let sampled = run(&["--temperature", "2.0", "--seed", "7"]);
    assert_eq!(sampled, run(&["--temperature", "2.0", "--seed", "7"]));
    assert_ne!(sampled, run(&["--temperature", "2.0", "--seed", "8"]));
    assert_ne!(sampled, run(&[]));
}

#[test]
fn a_bad_model_folder_or_setting_is_one_line_of_error() {
    let dir = dataset();
    let empty = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--model", empty.path().to_str().unwrap()],
            "no config.json",
        ),
        (&["--style", "trigger-only"], "needs --trigger"),
        (&["--max-tokens", "0"], "--max-tokens"),
        (&["--batch-size", "0"], "--batch-size must be at least 1"),
        (&["--sheet", "review.jpg"], "name a .png or .html file"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["caption", dir.path().to_str().unwrap()];
        let model = model();
        if !extra.contains(&"--model") {
            args.extend(["--model", &model]);
        }
        args.extend_from_slice(extra);
        let out = zlora(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    let out = caption(dir.path(), &["--max-pixels", "1000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.trim()
            .ends_with("below the processor's min_pixels 4096"),
        "{err}"
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn a_batch_writes_the_same_captions_and_an_unreadable_image_fails_alone() {
    let dir = dataset();
    fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
    let (prompt, wide) = reference_text("wide");
    let (_, tall) = reference_text("tall");
    let out = caption(
        dir.path(),
        &[
            "--prompt",
            &prompt,
            "--max-tokens",
            "30",
            "--batch-size",
            "3",
        ],
    );
    assert!(!out.status.success(), "a failed image fails the run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("captioned 2, skipped 0, failed 1"), "{err}");
    assert!(
        err.contains("failed") && err.contains("broken.png"),
        "{err}"
    );
    assert_eq!(read(dir.path(), "wide.txt"), wide);
    assert_eq!(read(dir.path(), "tall.txt"), tall);
    assert!(!dir.path().join("broken.txt").exists());
}

#[test]
fn quantized_weights_caption_and_a_format_that_does_not_fit_is_refused() {
    let dir = dataset();
    let err = stderr(&caption(
        dir.path(),
        &["--quantize", "q8_0", "--max-tokens", "4"],
    ));
    assert!(err.contains("captioned 2, skipped 0, failed 0"), "{err}");
    assert!(!read(dir.path(), "wide.txt").is_empty());
    let out = caption(dir.path(), &["--quantize", "q4_k", "--force"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("model.visual.blocks.0.attn.qkv.weight cannot be stored as q4_k")
            && last.contains("int8 and fp8 take any width"),
        "{err}"
    );
}
