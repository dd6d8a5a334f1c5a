//! `zlora serve`'s Datasets page beyond the grid: the trainer's dataset check with its bucket
//! counts (`GET /api/datasets/{name}/preflight` and the page), and caption jobs of the tiny
//! Qwen3-VL fixture queued through the API, which write what `zlora caption` writes and read
//! nothing outside the app's folder.

mod common;
mod serve_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use serve_common::{root_with_tiny, Server};
use zlora::sample::image::{encode_png, Rgb8};

fn png(width: usize, height: usize) -> Vec<u8> {
    let pixels = (0..width * height * 3)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    encode_png(
        &Rgb8 {
            width,
            height,
            pixels,
        },
        &[],
    )
    .unwrap()
}

const PAYLOAD: &str = "<img src=x onerror=alert(1)>";

/// At resolution 64 (min_side 32): three good images of three shapes, and one of each
/// problem the page must name.
fn problem_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let put = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    for (stem, w, h) in [("square", 64, 64), ("wide", 128, 64), ("tall", 48, 96)] {
        put(&format!("{stem}.png"), &png(w, h));
        put(
            &format!("{stem}.txt"),
            format!("a {stem} picture").as_bytes(),
        );
    }
    put("corrupt.png", b"\x89PNG\r\n\x1a\n not a png at all");
    put("corrupt.txt", b"corrupt");
    put("tiny.png", &png(16, 16));
    put("tiny.txt", b"too small");
    // Two images of one name would share dup.txt (the .jpg holds PNG bytes: decoders go by
    // content).
    put("dup.png", &png(64, 64));
    put("dup.jpg", &png(64, 64));
    put("dup.txt", b"duplicate");
    put("nocap.png", &png(64, 64));
    put("long.png", &png(64, 64));
    put("long.txt", "word ".repeat(600).as_bytes());
    put(&format!("{PAYLOAD}.png"), &png(16, 16));
    put(&format!("{PAYLOAD}.txt"), b"payload");
}

fn findings(report: &Value) -> BTreeSet<(String, String, String)> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap().to_string();
            (s("file"), s("kind"), s("severity"))
        })
        .collect()
}

#[test]
fn the_dataset_check_names_every_bad_file_and_counts_the_buckets() {
    let dir = root_with_tiny();
    problem_dataset(&dir.path().join("datasets/checked"));
    let s = Server::start(dir.path(), &[]);
    let r = s.get("/api/datasets/checked/preflight?resolution=64");
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    let error = |file: &str, kind: &str| (file.to_string(), kind.to_string(), "error".to_string());
    let expected: BTreeSet<_> = [
        error("corrupt.png", "unreadable"),
        error("tiny.png", "too_small"),
        error("dup.png", "duplicate_name"),
        error("dup.jpg", "duplicate_name"),
        error("nocap.png", "missing_caption"),
        error("long.txt", "caption_too_long"),
        error(&format!("{PAYLOAD}.png"), "too_small"),
    ]
    .into();
    assert_eq!(findings(&report), expected, "{report:#}");
    assert_eq!(
        (&report["images"], &report["usable"], &report["ready"]),
        (&json!(10), &json!(3), &json!(false)),
        "{report:#}"
    );
    assert_eq!(report["model"], "models/tiny");
    let summary = report["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("10 images at 64 px: 3 usable, 7 errors") && summary.contains("fix"),
        "{summary}"
    );
    // The three good images, one per bucket: square, wide and tall.
    let buckets = report["buckets"].as_array().unwrap();
    let sum: u64 = buckets.iter().map(|b| b["images"].as_u64().unwrap()).sum();
    assert_eq!(sum, report["usable"].as_u64().unwrap());
    let shape = |b: &Value| b["width"].as_u64().cmp(&b["height"].as_u64());
    let shapes: BTreeSet<_> = buckets.iter().map(shape).collect();
    assert_eq!(shapes.len(), 3, "{buckets:?}");
    assert!(report["bucket_count"].as_u64() > Some(3), "{report:#}");
    let messages = report["problems"].to_string();
    assert!(
        messages.contains("16×16 is smaller than min_side 32"),
        "{messages}"
    );

    // At 32 px (min_side 16) the small ones are usable too.
    let low = s
        .get("/api/datasets/checked/preflight?resolution=32")
        .json();
    assert_eq!(low["usable"], 5, "{low:#}");
    let sum: u64 = low["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["images"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, 5);

    // The page: the summary, each finding by file (escaped), the buckets.
    let page = s.get("/datasets/checked?resolution=64");
    assert_eq!(page.status, 200);
    let html = page.text();
    let table = &html[html
        .find("<table class=\"preflight\">")
        .expect("the findings")..];
    assert!(table.contains("<code>corrupt.png</code>") && table.contains("cannot be decoded"));
    assert!(table.contains("<code>long.txt</code>") && table.contains("512 tokens"));
    assert!(
        table.contains("<code>&lt;img src=x onerror=alert(1)&gt;.png</code>"),
        "{table}"
    );
    assert!(!html.contains("<img src=x"), "{html}");
    assert!(html.contains(summary.split(';').next().unwrap()), "{html}");
    assert!(html.contains("<h3>Buckets at 64 px</h3>"));
    assert!(html.contains("<td>64×64</td><td>1</td>"), "{html}");
    assert!(html.contains("<p class=\"finding error\">no caption file nocap.txt"));

    // Bad requests are one-line refusals.
    for (query, says) in [
        ("resolution=big", "whole number"),
        ("resolution=60", "multiple of 8"),
        ("model=/etc", "outside"),
        ("model=models/none", "models/none"),
        ("model=models/../../x", ".."),
    ] {
        let r = s.get(&format!("/api/datasets/checked/preflight?{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains(says),
            "{query}: {}",
            r.text()
        );
    }
    assert_eq!(s.get("/api/datasets/none/preflight").status, 404);
    assert_eq!(s.get("/api/datasets/%2e%2e/preflight").status, 400);

    // Without a Z-Image model there is nothing to measure captions with: said, on the page too.
    let bare = tempfile::tempdir().unwrap();
    problem_dataset(&bare.path().join("datasets/d"));
    let s = Server::start(bare.path(), &[]);
    let r = s.get("/api/datasets/d/preflight");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("put one under models/"), "{}", r.text());
    let page = s.get("/datasets/d");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("put one under models/"));
}

fn caption_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/caption")
}

fn copy_images(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["wide.png", "tall.png"] {
        std::fs::copy(caption_fixtures().join(name), to.join(name)).unwrap();
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

#[test]
fn caption_jobs_write_what_zlora_caption_writes_and_stay_inside_the_root() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("models/vl");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(caption_fixtures().join("model")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let data = root.path().join("datasets/cap");
    copy_images(&data);
    // What the CLI writes for the same settings, in a folder of its own.
    let reference = tempfile::tempdir().unwrap();
    copy_images(reference.path());
    common::stderr(&common::zlora(&[
        "caption",
        reference.path().to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--style",
        "short",
        "--trigger",
        "zk",
    ]));
    let expected = |name: &str| read(reference.path(), name);
    assert!(expected("wide.txt").starts_with("zk, "));

    // The same model as a repo in a Hugging Face cache of its own.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--tiny-vl");
    std::fs::create_dir_all(repo.join("snapshots/0123abcd")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(
            &f,
            repo.join("snapshots/0123abcd").join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    let s = Server::start_env(root.path(), &[], &[("HF_HUB_CACHE", cache.path())]);
    let outside = tempfile::tempdir().unwrap();
    copy_images(outside.path());
    std::os::unix::fs::symlink(outside.path(), root.path().join("datasets/out")).unwrap();
    let caption = |extra: Value| {
        let mut body = json!({"kind": "caption", "dataset": "cap", "model": "models/vl",
                              "style": "short", "trigger": "zk"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s.post_json("/api/jobs", &body)
    };
    for (extra, says) in [
        (json!({"dataset": "../cap"}), "not a plain"),
        (json!({"dataset": ".."}), "not a plain"),
        (json!({"dataset": "out"}), "symbolic link"),
        (json!({"dataset": "none"}), "no dataset"),
        (json!({"model": "/etc"}), "neither a folder under models/"),
        (json!({"model": "models/../../etc"}), "\"..\""),
        (
            json!({"model": outside.path().to_str().unwrap()}),
            "neither",
        ),
        (
            json!({"model": "nobody/no-such-vl"}),
            "not in the Hugging Face cache",
        ),
        (json!({"model": "models/none"}), "models/none"),
        (json!({"style": "poem"}), "must be one of"),
        (json!({"force": "yes"}), "true or false"),
        (
            json!({"force": true, "skip_existing": true}),
            "exclude each other",
        ),
    ] {
        let r = caption(extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(says), "{extra}: {error}");
    }
    assert_eq!(s.get("/api/jobs").json(), json!([]));
    assert!(!outside.path().join("wide.txt").exists());

    // An existing caption: refused unless a box says what to do with it.
    std::fs::write(data.join("wide.txt"), "mine").unwrap();
    let r = caption(json!({}));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("already have a caption"), "{}", r.text());
    assert!(!data.join("tall.txt").exists());

    let done = |r: serve_common::Reply| {
        assert_eq!(r.status, 201, "{}", r.text());
        let id = r.json()["id"].as_i64().unwrap();
        s.wait_job(id, 300, |j| {
            j["state"] != "queued" && j["state"] != "running"
        })
    };
    let job = done(caption(json!({"skip_existing": true})));
    assert_eq!(
        job,
        json!({"id": job["id"], "kind": "caption", "state": "done", "step": 2, "steps": 2,
               "output": "datasets/cap", "rate": null, "error": null, "phase": null})
    );
    assert_eq!(read(&data, "wide.txt"), "mine");
    assert_eq!(read(&data, "tall.txt"), expected("tall.txt"));
    let page = s.get(&format!("/jobs/{}", job["id"])).text();
    assert!(
        page.contains("image 2 / 2") && !page.contains("<h2>Loss</h2>"),
        "{page}"
    );
    assert!(page.contains("captioned 1, skipped 1, failed 0"), "{page}");

    // Overwriting, with the model named by its repo id: read from the cache's snapshot.
    std::fs::write(data.join("wide.txt"), "mine").unwrap();
    let job = done(caption(json!({"force": true, "model": "org/tiny-vl"})));
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(read(&data, "wide.txt"), expected("wide.txt"));
    assert_eq!(read(&data, "tall.txt"), expected("tall.txt"));
    let page = s.get(&format!("/jobs/{}", job["id"])).text();
    assert!(page.contains("snapshots/0123abcd"), "{page}");

    // A job that failed on one image resumes with the captions it wrote kept: run again, it
    // skips them (without that, its own captions would be refused as existing ones).
    let again = root.path().join("datasets/again");
    copy_images(&again);
    std::fs::write(again.join("broken.png"), b"not a png").unwrap();
    let failed = done(caption(json!({"dataset": "again"})));
    assert_eq!(failed["state"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("1 image(s) could not be captioned") && error.contains("broken.png"),
        "{error}"
    );
    assert_eq!(read(&again, "wide.txt"), expected("wide.txt"));
    std::fs::remove_file(again.join("broken.png")).unwrap();
    let id = failed["id"].as_i64().unwrap();
    let r = s.request("POST", &format!("/api/jobs/{id}/resume"), &[], b"");
    assert_eq!(r.status, 202, "{}", r.text());
    let resumed = s.wait_job(id, 300, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(resumed["state"], "done", "{resumed}");
    let log = std::fs::read_to_string(root.path().join(format!(".zlora-serve/jobs/{id}/log.txt")))
        .unwrap();
    assert!(
        log.contains("== resumed ==") && log.contains("captioned 0, skipped 2, failed 0"),
        "{log}"
    );

    // The dataset page's form: the model offered, overwriting a box of its own.
    let html = s.get("/datasets/cap").text();
    assert!(html.contains("<input type=\"hidden\" name=\"kind\" value=\"caption\">"));
    assert!(html.contains("value=\"models/vl\""), "{html}");
    assert!(html.contains("<input type=\"checkbox\" name=\"force\">"));
}
