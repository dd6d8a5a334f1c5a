//! `zlora serve`'s New run and Results pages at the HTTP level: the form writes a config that
//! parses and plans as `zlora plan` does for the chosen GPU, and queues it; runs list their
//! LoRAs, which download converted in any layout; run names cannot leave runs/; LoRA
//! metadata and run names are escaped; two runs' grids are compared at one step.

mod common;
mod serve_common;

use serde_json::{json, Value};
use serve_common::{percent_encode, root_with_tiny, train_config, validation_plan, Server};
use zlora::lora::write::{save, Metadata};
use zlora::lora::{Layout, LoraFile};
use zlora::train::config::{TrainConfig, Variant};

/// The text of the page's config textarea, unescaped.
fn textarea(page: &str) -> String {
    let start = page.find("<textarea").unwrap();
    let open = start + page[start..].find('>').unwrap() + 1;
    let close = open + page[open..].find("</textarea>").unwrap();
    page[open..close]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// `zlora plan --json --gpu GPU` of the config text, run in `dir` (where its paths are).
fn cli_plan(dir: &std::path::Path, text: &str, gpu: &str) -> Value {
    let file = dir.join("plan.toml");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zlora"))
        .args(["plan", "plan.toml", "--json", "--gpu", gpu])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_new_run_form_writes_a_config_that_parses_plans_and_queues() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let form = s.get("/new");
    assert_eq!(form.status, 200);
    for way in ["base", "turbo-adapter", "turbo-direct", "de-turbo"] {
        assert!(form.text().contains(&format!("value=\"{way}\"")), "{way}");
    }
    assert!(form.text().contains("<option value=\"h100\""));

    let planned = tempfile::tempdir().unwrap();
    for (way, variant, adapter) in [
        ("base", Variant::Base, false),
        ("turbo-adapter", Variant::Turbo, true),
        ("turbo-direct", Variant::Turbo, false),
        ("de-turbo", Variant::DeTurbo, false),
    ] {
        let page = s.post_form(
            "/new",
            &[
                ("action", "fields"),
                ("way", way),
                ("gpu", "h100"),
                ("trigger", "abc"),
                ("resolution", "512"),
                ("steps", "100"),
                ("output", "runs/x"),
            ],
        );
        assert_eq!(page.status, 200, "{}", page.text());
        let text = textarea(&page.text());
        let cfg = TrainConfig::parse(&text).unwrap_or_else(|e| panic!("{way}: {e}\n{text}"));
        assert_eq!(cfg.model.variant, variant);
        assert_eq!(cfg.train.steps, 100);
        assert_eq!(cfg.datasets[0].trigger.as_deref(), Some("abc"));
        assert_eq!(cfg.model.training_adapter.is_some(), adapter, "{way}");
        assert!(cfg.sample.prompts.iter().all(|p| p.contains("abc")));
        // The verdict is zlora plan's for that GPU (no model or adapter files: the published
        // sizes).
        let cli = cli_plan(planned.path(), &text, "h100");
        let gpu = &cli["gpus"][0];
        let html = page.text();
        assert!(html.contains("Plan: H100 SXM 80GB"), "{html}");
        let fits = if gpu["fits"].as_bool().unwrap() {
            "Fits: "
        } else {
            "Does not fit: "
        };
        let peak = format!(
            "{fits}peak {:.1} GiB",
            gpu["peak_memory_gib"].as_f64().unwrap()
        );
        assert!(html.contains(&peak), "{peak} not in {html}");
        let cost = format!("${:.2} at", gpu["cost_usd"].as_f64().unwrap());
        assert!(html.contains(&cost), "{cost} not in {html}");
    }
    // Edited TOML is checked as it is; errors are shown escaped.
    let page = s.post_form(
        "/new",
        &[("action", "toml"), ("config", "<script>alert(1)</script>")],
    );
    assert!(page.text().contains("&lt;script&gt;alert(1)"));
    assert!(!page.text().contains("<script>alert(1)"));

    // Queueing goes through the API's checks: a path out of the folder is refused, no job.
    let outside = train_config("../elsewhere", 4, 2, 0);
    let refused = s.post_form("/new", &[("action", "queue"), ("config", &outside)]);
    assert_eq!(refused.status, 400);
    assert!(refused.text().contains("outside") || refused.text().contains(".."));
    assert_eq!(s.get("/api/jobs").json().as_array().unwrap().len(), 0);
    let queued = s.post_form(
        "/new",
        &[
            ("action", "queue"),
            ("config", &train_config("runs/q", 4, 2, 0)),
        ],
    );
    assert_eq!(queued.status, 303, "{}", queued.text());
    let to = queued.header("location").unwrap().to_string();
    let id: i64 = to.strip_prefix("/jobs/").unwrap().parse().unwrap();
    let job = s.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(
        (job["kind"].as_str(), job["output"].as_str()),
        (Some("train"), Some("runs/q"))
    );
}

fn run_job(s: &Server, kind: &str, config: &str) {
    let r = s.post_json("/api/jobs", &json!({"kind": kind, "config": config}));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let job = s.wait_job(id, 300, |j| {
        !matches!(j["state"].as_str(), Some("queued" | "running"))
    });
    assert_eq!(job["state"], "done", "{job}");
}

#[test]
fn results_list_runs_download_loras_in_any_layout_and_compare_samples() {
    let dir = root_with_tiny();
    let s = Server::start(dir.path(), &[]);
    run_job(&s, "train", &train_config("runs/r1", 4, 2, 2));
    run_job(
        &s,
        "validate",
        &validation_plan("runs/r1/lora.safetensors", "reports/v1"),
    );
    let trained = LoraFile::read(dir.path().join("runs/r1/lora.safetensors")).unwrap();

    let list = s.get("/results").text();
    assert!(list.contains("href=\"/runs/r1\""), "{list}");
    assert!(list.contains("/runs/r1/lora?layout=comfyui"));
    assert!(list.contains("/report/reports/v1/report%2Ehtml"), "{list}");

    for (name, layout, step) in [
        ("comfyui", Layout::ComfyFused, ""),
        ("diffusers", Layout::DiffusersPeft, ""),
        ("musubi", Layout::Kohya, "&step=2"),
    ] {
        let r = s.get(&format!("/runs/r1/lora?layout={name}{step}"));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let disposition = r.header("content-disposition").unwrap();
        assert!(disposition.contains(&format!("r1-{name}.safetensors")));
        let file = dir.path().join(format!("got-{name}.safetensors"));
        std::fs::write(&file, &r.body).unwrap();
        let back = LoraFile::read(&file).unwrap();
        assert_eq!(back.layout, layout);
        let keys = |f: &LoraFile| f.modules.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&back), keys(&trained), "{name}");
    }
    assert_eq!(s.get("/runs/r1/lora?layout=sdxl").status, 400);
    assert_eq!(s.get("/runs/r1/lora?step=x").status, 400);
    assert_eq!(s.get("/runs/r1/lora?step=3").status, 404);
    s.assert_refused(&[
        "/runs/../lora",
        "/runs/%2e%2e/lora",
        "/runs/..%2f..%2fmodels/lora",
        "/runs/.zlora-serve/lora",
    ]);
    assert_eq!(s.get("/compare?a=r1&b=..&step=2").status, 400);

    // A LoRA whose metadata and run name carry markup: shown as text.
    let payload = "<script>alert(1)</script>";
    let evil_name = "<img src=x onerror=alert(2)>";
    let evil_dir = dir.path().join("runs").join(evil_name);
    std::fs::create_dir_all(&evil_dir).unwrap();
    let metadata = Metadata {
        title: Some(payload.into()),
        ..Metadata::default()
    };
    let lora = evil_dir.join("lora.safetensors");
    save(
        &lora,
        &trained.modules,
        Layout::AiToolkit,
        candle_core::DType::F32,
        &metadata,
        false,
    )
    .unwrap();
    let run_url = format!("/runs/{}", percent_encode(evil_name));
    let page = s.get(&run_url).text();
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains(payload));
    let list = s.get("/results").text();
    assert!(list.contains("&lt;img src=x onerror=alert(2)&gt;"));
    assert!(!list.contains(evil_name));

    let compare = s
        .get(&format!(
            "/compare?a=r1&b={}&step=2",
            percent_encode(evil_name)
        ))
        .text();
    assert!(
        compare.contains("/files/runs/r1/samples/step%2D000002%2Epng"),
        "{compare}"
    );
    assert!(compare.contains("no samples at this step"));
    assert!(!compare.contains(evil_name));
}

#[test]
fn serve_demo_opens_the_app_on_the_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("app");
    let s = Server::start(&root, &["--demo"]);
    let datasets = s.get("/api/datasets").json();
    assert_eq!(datasets, json!([{"name": "tiny", "images": 8}]));
    let results = s.get("/results").text();
    assert!(results.contains("href=\"/runs/tiny\""), "{results}");
    assert!(
        results.contains("/report/reports/tiny/report%2Ehtml"),
        "{results}"
    );
    assert_eq!(s.get("/runs/tiny/lora?layout=comfyui").status, 200);
    s.kill();
    // Opened again as it is (the demo is not made twice); another folder is refused.
    let again = Server::start(&root, &["--demo"]);
    assert!(again.get("/results").text().contains("/runs/tiny"));
    again.kill();
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("mine.txt"), "keep").unwrap();
    let refused = common::zlora(&["serve", "--root", other.to_str().unwrap(), "--demo"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("choose another --root"));
}
