//! The web app's workflow in headless Chromium, by mouse clicks and typing (serve_common/cdp.rs):
//! open the app, make a dataset from the built-in tiny one, edit a caption, write a run on the
//! New run page and queue it, watch the loss chart and the sample grids, stop, resume, queue a
//! validation and open its report, see the run in Results and compare its grids, then see the
//! dataset check and caption the dataset from its page. A screenshot of each stage is kept in
//! target/tmp/serve-walk/. Not done with the mouse: making the models (the operator's part, by
//! the CLI and a copy) and choosing "validate" in a <select> (set by script: its popup is not
//! part of the page).

mod common;
mod serve_common;

use serve_common::cdp::Browser;
use serve_common::{train_config, validation_plan, Server};

/// Where the screenshots are kept (test artifacts).
fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-walk");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shot(b: &mut Browser, name: &str) {
    let png = artifacts().join(format!("{name}.png"));
    b.screenshot(&png);
    let (img, _) = zlora::sample::image::read_png(&png).unwrap();
    assert_eq!(img.width, 1100, "{name}");
}

/// The job page's title says `state` (the page reloads itself as the job changes).
fn job_is(state: &str) -> String {
    format!("document.querySelector('h1').textContent.endsWith('· {state}')")
}

#[test]
fn the_workflow_by_clicks_in_chromium() {
    let root = tempfile::tempdir().unwrap();
    // The model is the one thing the app does not make: put there as an operator would.
    let model = root.path().join("models/tiny");
    common::stderr(&common::zlora(&[
        "tiny-model",
        "--out",
        model.to_str().unwrap(),
        "--dim",
        "32",
    ]));
    let s = Server::start(root.path(), &[]);
    let base = format!("http://127.0.0.1:{}", s.port);
    let mut b = Browser::start(common::chromium());

    b.goto(&format!("{base}/jobs"));
    assert!(b.html().contains("No jobs yet."));
    shot(&mut b, "01-jobs");

    // A dataset from the built-in tiny one.
    b.click_to_load("nav a[href='/datasets']");
    b.type_into("input[name=name]", "walk");
    b.click("input[name=tiny]");
    b.click_to_load("form button");
    b.wait_for("document.querySelector(\"a[href='/datasets/walk']\")", 30);
    shot(&mut b, "02-datasets");

    // A caption edited in place: saved when the field is left.
    b.click_to_load("a[href='/datasets/walk']");
    let caption = "zkchar, a caption typed in the browser";
    b.type_into("textarea[data-put]", caption);
    b.click("h1");
    b.wait_for(
        "document.querySelector('textarea[data-put]').classList.contains('saved')",
        30,
    );
    let first = root.path().join("datasets/walk/000.txt");
    assert_eq!(std::fs::read_to_string(first).unwrap(), caption);
    shot(&mut b, "03-dataset");

    // New run: the form's fields make a config and a verdict; then the TOML is edited to a
    // long tiny run (its own sample and checkpoint steps), checked and queued.
    b.click_to_load("nav a[href='/new']");
    b.click("input[value='turbo-direct']");
    b.type_into("input[name=model]", "models/tiny");
    b.type_into("input[name=dataset]", "datasets/walk");
    b.type_into("input[name=resolution]", "32");
    b.click_to_load("button[value=fields]");
    let page = b.html();
    assert!(page.contains("Plan: GeForce RTX 4090"), "{page}");
    shot(&mut b, "04-new-run");
    let config =
        train_config("runs/walk", 4000, 2000, 400).replace("datasets/tiny", "datasets/walk");
    b.type_into("textarea[name=config]", &config);
    b.click_to_load("button[value=toml]");
    assert!(b.html().contains("id=\"verdict\""));
    b.click_to_load("button[value=queue]");
    assert!(b.url().ends_with("/jobs/1"), "{}", b.url());

    // The loss chart and a sample grid past step 0, live.
    b.wait_for(
        "document.querySelector('svg.chart polyline.loss') && [...document.querySelectorAll('figcaption')].some(f => /step-0*[1-9]/.test(f.textContent))",
        120,
    );
    shot(&mut b, "05-training");

    // Stop: a clean stop with a checkpoint. The page reloads every time the step changes, so
    // a click that lands on a page being replaced is tried again.
    for _ in 0..5 {
        b.click("button[data-post$='/stop']");
        if s.wait_job_for(1, 5, |j| j["state"] != "running") {
            break;
        }
    }
    b.wait_for(&job_is("stopped"), 60);
    let stopped = s.get("/api/jobs/1").json();
    assert_eq!(stopped["state"], "stopped");
    let at = stopped["step"].as_u64().unwrap();
    assert!(at < 4000, "stopped at {at}");
    shot(&mut b, "06-stopped");

    b.click("button[data-post$='/resume']");
    b.wait_for(&job_is("done"), 300);
    assert!(root.path().join("runs/walk/lora.safetensors").is_file());
    // Resumed, not started over (which would have emptied the folder): the stop's
    // checkpoint is still there.
    let kept = root
        .path()
        .join(format!("runs/walk/checkpoints/step-{at:06}"));
    assert!(kept.is_dir(), "{} is gone", kept.display());
    shot(&mut b, "07-done");

    // A validation of the LoRA from the Jobs page, and its report.
    b.click_to_load("nav a[href='/jobs']");
    // The one step not done with the mouse: a <select>'s popup is not part of the page.
    b.eval("document.querySelector('select[name=kind]').value = 'validate'");
    b.type_into(
        "textarea[name=config]",
        &validation_plan("runs/walk/lora.safetensors", "reports/walk"),
    );
    b.click_to_load("form[data-json] button");
    assert!(b.url().ends_with("/jobs/2"), "{}", b.url());
    b.wait_for(&job_is("done"), 300);
    // The report runs no script (its own sandboxing policy), so it is watched through the
    // browser's history and DOM; a click that lands while the page is replaced is tried again.
    let opened = |b: &mut Browser| {
        b.url().contains("/report/reports/walk/") && b.html().contains("zlora validation")
    };
    for _ in 0..3 {
        if !b.url().contains("/report/") {
            b.click("a[href^='/report/']");
        }
        let start = std::time::Instant::now();
        while !opened(&mut b) && start.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    assert!(opened(&mut b), "the report did not open: {}", b.url());
    shot(&mut b, "08-report");

    b.goto(&format!("{base}/results"));
    b.wait_for("document.querySelector(\"a[href='/runs/walk']\")", 30);
    assert!(b.html().contains("/report/reports/walk/report%2Ehtml"));
    shot(&mut b, "09-results");
    b.type_into("input[name=step]", "400");
    b.click_to_load("form[action='/compare'] button");
    assert!(b
        .html()
        .contains("/files/runs/walk/samples/step%2D000400%2Epng"));
    shot(&mut b, "10-compare");

    // Captions from the dataset's page, with the tiny Qwen3-VL fixture put under models/ as an
    // operator would: the folder is offered, and overwriting the captions takes its own box.
    let vl = root.path().join("models/vl");
    std::fs::create_dir_all(&vl).unwrap();
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/caption/model");
    for f in std::fs::read_dir(fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, vl.join(f.file_name().unwrap())).unwrap();
    }
    b.goto(&format!("{base}/datasets/walk"));
    let page = b.html();
    assert!(
        page.contains("<table class=\"preflight\">") && page.contains("Buckets at 1024 px"),
        "{page}"
    );
    b.type_into("form.caption input[name=trigger]", "zkwalk");
    b.click("form.caption input[name=force]");
    shot(&mut b, "11-dataset-check");
    b.click_to_load("form.caption button");
    assert!(b.url().ends_with("/jobs/3"), "{}", b.url());
    b.wait_for(&job_is("done"), 120);
    let caption = std::fs::read_to_string(root.path().join("datasets/walk/000.txt")).unwrap();
    assert!(caption.starts_with("zkwalk, "), "{caption}");
    shot(&mut b, "12-captioned");
}
