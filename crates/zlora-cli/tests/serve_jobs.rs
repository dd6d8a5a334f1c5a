//! `zlora serve`'s job kinds beyond train and validate, through the HTTP API: experiment
//! (`zlora experiment --events json`: checked like a train config, run through the queue,
//! stopped with a checkpoint and resumed), sweep (`zlora sweep --events json`: every path of
//! the plan confined like an experiment's, its arms run through the queue to the report, a
//! rerun keeping the finished arms) and fetch (`zlora fetch --events json` into
//! DIR/models/hub from a local Hub, its bytes as progress; an unknown name fails with the
//! CLI's error); and the New run page's live verdict (`POST /api/plan`), over HTTP and typed
//! into in headless Chromium.

#[path = "../../zlora/tests/hub_server/mod.rs"]
mod hub_server;

mod common;
mod serve_common;

use std::path::Path;

use serde_json::{json, Value};
use serve_common::cdp::Browser;
use serve_common::{root_with_tiny, tiny_run_tables, train_config, Reply, Server};
use zlora::hub::known::TURBO_REPO;
use zlora::validate::arms::ArmsPlan;
use zlora::validate::experiment::ExperimentPlan;

/// An experiment plan on the tiny model (as Base and Turbo) and dataset, with the LoRA of a
/// tiny run at runs/adapter as its training adapter, into `output`.
fn experiment_plan(output: &str, steps: u64, save_every: u64) -> String {
    format!(
        r#"output = "{output}"
base = "models/tiny"
turbo = "models/tiny"
training_adapter = "runs/adapter/lora.safetensors"
base_dtype = "f32"

{}
[render]
prompts = ["a red circle"]
seeds = [1]
width = 32
height = 32
"#,
        tiny_run_tables(steps, save_every)
    )
}

fn queue(s: &Server, body: Value) -> i64 {
    let r = s.post_json("/api/jobs", &body);
    assert_eq!(r.status, 201, "{body}: {}", r.text());
    r.json()["id"].as_i64().unwrap()
}

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |j| j["state"] == state
}

fn log(s: &Server, id: i64) -> String {
    std::fs::read_to_string(s.root.join(format!(".zlora-serve/jobs/{id}/log.txt"))).unwrap()
}

#[test]
fn job_requests_of_every_kind_are_checked_and_experiment_paths_stay_inside() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    std::os::unix::fs::symlink("/tmp", tmp.path().join("datasets/out")).unwrap();
    let plan = experiment_plan("exp", 2, 2);
    let kinds = "\"kind\" must be one of \"train\", \"validate\", \"caption\", \"experiment\", \"sweep\", \"fetch\"";
    let bad = [
        (json!({"kind": "deploy", "config": plan}), kinds),
        (json!({"kind": "experiment"}), "needs \"config\""),
        (json!({"kind": "fetch"}), "needs \"repo\""),
        (
            json!({"kind": "fetch", "config": "turbo"}),
            "needs \"repo\"",
        ),
        (json!({"kind": "fetch", "repo": 3}), "needs \"repo\""),
        (json!({"kind": "fetch", "repo": " "}), "\"repo\" must be"),
        (json!({"kind": "fetch", "repo": "a\nb"}), "\"repo\" must be"),
        (
            json!({"kind": "experiment", "config": plan.replace("output = \"exp\"", "output = \"../exp\"")}),
            "output = \"../exp\" contains \"..\"",
        ),
        (
            json!({"kind": "experiment", "config": plan.replace("output = \"exp\"", "output = \"/tmp/exp\"")}),
            "output = \"/tmp/exp\" is outside",
        ),
        (
            json!({"kind": "experiment", "config": plan.replace("runs/adapter/lora.safetensors", "/etc/passwd")}),
            "training_adapter = \"/etc/passwd\" is outside",
        ),
        (
            json!({"kind": "experiment", "config": plan.replace("base = \"models/tiny\"", "base = \"/models/tiny\"")}),
            "base = \"/models/tiny\" is outside",
        ),
        (
            json!({"kind": "experiment", "config": plan.replace("path = \"datasets/tiny\"", "path = \"../../d\"")}),
            "[dataset] path = \"../../d\" contains",
        ),
        (
            json!({"kind": "experiment", "config": plan.replace("path = \"datasets/tiny\"", "path = \"datasets/out/x\"")}),
            "leads out through a symbolic link",
        ),
        (
            json!({"kind": "experiment", "config": plan.replace("path = \"datasets/tiny\"", "path = \"datasets/tiny\"\ncache_dir = \"/var/c\"")}),
            "[dataset] cache_dir = \"/var/c\" is outside",
        ),
        (
            json!({"kind": "experiment", "config": plan.replace("save_every = 2", "save_every = 2\noutput = \"runs/x\"")}),
            "[train] output is set by the plan",
        ),
        (
            json!({"kind": "experiment", "config": format!("typo = 1\n{plan}")}),
            "config: ",
        ),
    ];
    for (body, message) in bad {
        let r = s.post_json("/api/jobs", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(message), "{body}: {error}");
    }
    assert_eq!(s.get("/api/jobs").json(), json!([]), "nothing was queued");
}

/// A sweep plan on the tiny model (as Base and Turbo) and dataset, `steps` per arm with a
/// sample grid at the end, rendered at 32 px with two sampling steps, into `output`; `arms`
/// is its `[grid]` or `[[arm]]` tables.
fn sweep_plan(output: &str, steps: u64, save_every: u64, arms: &str) -> String {
    format!(
        r#"output = "{output}"
base = "models/tiny"
turbo = "models/tiny"
base_dtype = "f32"

{}
[sample]
every = {steps}
prompts = ["a red circle"]
seeds = [1]

[render]
prompts = ["a red circle"]
seeds = [1]
width = 32
height = 32

[sampling.base]
steps = 2
guidance = 2.0

[sampling.turbo]
steps = 2
guidance = 0.0

[sampling.turbo_long]
steps = 3
guidance = 0.0

{arms}"#,
        tiny_run_tables(steps, save_every)
    )
}

const RANKS: &str = "[grid]\nmode = [\"turbo-direct\"]\nrank = [2, 4]\n";

#[test]
fn sweep_plans_with_a_path_outside_or_a_mistake_are_refused_and_nothing_is_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    std::os::unix::fs::symlink("/tmp", tmp.path().join("datasets/out")).unwrap();
    let grid = |datasets: &str| {
        sweep_plan(
            "sw",
            2,
            2,
            &format!("[grid]\nmode = [\"turbo-direct\"]\ndataset = [{datasets}]\n"),
        )
    };
    let bad = [
        (
            grid("\"datasets/tiny\", \"../d\""),
            "[grid] dataset = \"../d\" contains \"..\"",
        ),
        (grid("\"/tmp/d\""), "[grid] dataset = \"/tmp/d\" is outside"),
        (
            grid("\"datasets/out/d\""),
            "[grid] dataset = \"datasets/out/d\" leads out through a symbolic link",
        ),
        (
            sweep_plan(
                "sw",
                2,
                2,
                "[[arm]]\nmode = \"base\"\n[[arm]]\nmode = \"base\"\ndataset = \"/tmp/d\"\n",
            ),
            "[[arm]] dataset = \"/tmp/d\" is outside",
        ),
        (
            format!(
                "de_turbo = \"/models/dt\"\n{}",
                sweep_plan("sw", 2, 2, RANKS)
            ),
            "de_turbo = \"/models/dt\" is outside",
        ),
        (
            format!("de_turbo = \"../dt\"\n{}", sweep_plan("sw", 2, 2, RANKS)),
            "de_turbo = \"../dt\" contains",
        ),
        (
            sweep_plan("../sw", 2, 2, RANKS),
            "output = \"../sw\" contains",
        ),
        (
            sweep_plan("sw", 2, 2, RANKS).replace("path = \"datasets/tiny\"", "path = \"/tmp/d\""),
            "[dataset] path = \"/tmp/d\" is outside",
        ),
        (
            format!("typo = 1\n{}", sweep_plan("sw", 2, 2, RANKS)),
            "unknown field `typo`",
        ),
        (
            sweep_plan("sw", 2, 2, "[grid]\nmode = [\"base\"]\nrnak = [4]\n"),
            "unknown field `rnak`",
        ),
        // Refused by the sweep's own check, not by the paths: no arms, an arm without a mode.
        (
            sweep_plan("sw", 2, 2, ""),
            "a sweep plan needs a [grid] or [[arm]] tables",
        ),
        (
            sweep_plan("sw", 2, 2, "[grid]\nrank = [2]\n"),
            "arm r2 has no mode",
        ),
    ];
    for (config, message) in bad {
        let r = s.post_json("/api/jobs", &json!({"kind": "sweep", "config": config}));
        assert_eq!(r.status, 400, "{config}: {}", r.text());
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(message), "{message}: {error}");
    }
    assert_eq!(s.get("/api/jobs").json(), json!([]), "nothing was queued");
}

#[test]
fn a_sweep_job_runs_its_arms_to_the_report_and_a_rerun_keeps_the_finished_arms() {
    let dir = root_with_tiny();
    let s = Server::start(dir.path(), &[]);
    let plan = sweep_plan("runs/sw", 2, 2, RANKS);
    let id = queue(&s, json!({"kind": "sweep", "config": plan}));
    let job = s.wait_job(id, 300, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(job["state"], "done", "{job}\n{}", log(&s, id));
    assert_eq!(
        (job["kind"].as_str(), job["output"].as_str()),
        (Some("sweep"), Some("runs/sw"))
    );
    // The last phase: the second arm's validation, all its images rendered.
    assert_eq!(
        job["phase"], "turbo-direct_r4 validating · arm 2 of 2",
        "{job}"
    );
    assert!(
        job["steps"].as_u64().unwrap() > 0 && job["step"] == job["steps"],
        "{job}"
    );
    let out = dir.path().join("runs/sw");
    assert!(out.join("report.html").is_file() && out.join("sweep.json").is_file());
    let arms = ["turbo-direct_r2", "turbo-direct_r4"];
    for arm in arms {
        assert!(
            out.join(format!("runs/{arm}/lora.safetensors")).is_file(),
            "{arm}"
        );
        assert!(
            log(&s, id).contains(&format!("arm {arm} finished")),
            "{}",
            log(&s, id)
        );
    }
    let page = s.get(&format!("/jobs/{id}")).text();
    assert!(
        page.contains("/report/runs/sw/report%2Ehtml\">Sweep report"),
        "{page}"
    );
    // Each arm's loss chart (two steps) and its sample grid at step 2 (URL-encoded names).
    for (arm, url) in arms
        .iter()
        .zip(["turbo%2Ddirect%5Fr2", "turbo%2Ddirect%5Fr4"])
    {
        assert!(
            page.contains(&format!("<h2>Loss · {arm}</h2><svg")),
            "{arm}: {page}"
        );
        assert!(
            page.contains(&format!(
                "<img src=\"/files/runs/sw/runs/{url}/samples/step%2D000002%2Epng\""
            )),
            "{arm}: {page}"
        );
    }
    assert!(s
        .get("/jobs")
        .text()
        .contains("turbo-direct_r4 validating · arm 2 of 2: "));
    // Results: the sweep's folder as a sweep (its arms, its report), not a run without a LoRA.
    let results = s.get("/results").text();
    assert!(
        results.contains("sw <span class=\"muted\">(sweep)</span>")
            && results.contains("<code>turbo-direct_r2</code></a> <a href=\"/runs/sw/arms/turbo%2Ddirect%5Fr4\"><code>turbo-direct_r4</code>")
            && results.contains("href=\"/report/runs/sw/report%2Ehtml\""),
        "{results}"
    );
    // Each arm's page: its LoRA in every layout, its checkpoints, its validation report.
    let arm_page = s.get("/runs/sw/arms/turbo-direct_r2");
    assert_eq!(arm_page.status, 200, "{}", arm_page.text());
    let arm_page = arm_page.text();
    assert!(
        arm_page.contains("href=\"/runs/sw/arms/turbo%2Ddirect%5Fr2/lora?layout=comfyui\"")
            && arm_page.contains("/lora?layout=musubi&amp;step=2\"")
            && arm_page.contains("/report/runs/sw/validation/turbo%2Ddirect%5Fr2/report%2Ehtml"),
        "{arm_page}"
    );
    let r = s.get("/runs/sw/arms/turbo-direct_r2/lora?layout=comfyui");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-disposition")
        .unwrap()
        .contains("sw_turbo-direct_r2-comfyui.safetensors"));
    let file = dir.path().join("arm-comfyui.safetensors");
    std::fs::write(&file, &r.body).unwrap();
    let back = zlora::lora::LoraFile::read(&file).unwrap();
    assert_eq!(back.layout, zlora::lora::Layout::ComfyFused);
    assert_eq!(s.get("/runs/sw/arms/nope").status, 404);
    s.assert_refused(&[
        "/runs/sw/arms/..",
        "/runs/sw/arms/%2e%2e/lora",
        "/runs/..%2f..%2fmodels/arms/x",
        "/runs/sw/arms/..%2f..%2f..%2fmodels/lora",
    ]);

    // Queued again, the sweep keeps both finished arms and writes its report again.
    let again = queue(&s, json!({"kind": "sweep", "config": plan}));
    let job = s.wait_job(again, 120, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(job["state"], "done", "{job}\n{}", log(&s, again));
    let text = log(&s, again);
    for arm in arms {
        assert!(
            text.contains(&format!("{arm}: finished earlier, not repeated")),
            "{text}"
        );
    }
}

#[test]
fn a_sweep_job_is_stopped_and_resumed_by_running_it_again() {
    let dir = root_with_tiny();
    let s = Server::start(dir.path(), &[]);
    let id = queue(
        &s,
        json!({"kind": "sweep", "config": sweep_plan("runs/long", 100000, 50, RANKS)}),
    );
    let first_arm = |j: &Value| {
        j["state"] == "running"
            && j["phase"] == "turbo-direct_r2 training · arm 1 of 2"
            && j["step"].as_u64() > Some(50)
    };
    s.wait_job(id, 120, first_arm);
    let stop = |s: &Server| {
        let r = s.request("POST", &format!("/api/jobs/{id}/stop"), &[], b"");
        assert_eq!(r.status, 202);
        let stopped = s.wait_job(id, 60, |j| j["state"] != "running");
        assert_eq!(
            (stopped["state"].as_str(), &stopped["error"]),
            (Some("stopped"), &Value::Null),
            "{stopped}\n{}",
            log(s, id)
        );
    };
    stop(&s);
    let r = s.request("POST", &format!("/api/jobs/{id}/resume"), &[], b"");
    assert_eq!(r.status, 202);
    // The sweep runs again in its own folder: its first arm resumes from its latest
    // checkpoint and trains on (the job's phase and step are the stop's until the rerun's
    // events come).
    let checkpoints = dir
        .path()
        .join("runs/long/runs/turbo-direct_r2/checkpoints");
    let resumed = format!("resumed from {}/step-", checkpoints.display());
    let trained_again = |j: &Value| {
        let text = log(&s, id);
        let rerun = text.split("== resumed ==").nth(1).unwrap_or_default();
        j["state"] == "running"
            && rerun.contains("arm turbo-direct_r2 started")
            && rerun.contains(&resumed)
            && rerun.contains("checkpoint ")
    };
    s.wait_job(id, 120, trained_again);
    stop(&s);
}

/// The size of every file under `dir` (links followed).
fn bytes_under(dir: &Path) -> u64 {
    zlora::fsutil::sorted_entries(dir)
        .unwrap()
        .iter()
        .map(|p| match p.is_dir() {
            true => bytes_under(p),
            false => std::fs::metadata(p).unwrap().len(),
        })
        .sum()
}

#[test]
fn a_fetch_job_downloads_into_the_folder_and_an_unknown_name_fails_with_the_cli_error() {
    let tmp = tempfile::tempdir().unwrap();
    let published = tmp.path().join("published");
    zlora::model::tiny::create(&published, &zlora::model::tiny::TinySpec::default(), false)
        .unwrap();
    let hub = hub_server::HubServer::start();
    hub.add_repo(TURBO_REPO, &published, &[]);
    // The server's own HF_HUB_CACHE is not where its jobs fetch to.
    let elsewhere = tmp.path().join("elsewhere");
    let root = tmp.path().join("root");
    let s = Server::start_env(
        &root,
        &[],
        &[
            ("HF_ENDPOINT", hub.endpoint.as_str()),
            ("HF_HUB_CACHE", elsewhere.to_str().unwrap()),
        ],
    );

    let unknown = queue(&s, json!({"kind": "fetch", "repo": "no-such-model"}));
    let job = s.wait_job(unknown, 60, state_is("failed"));
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("\"no-such-model\" is neither a known name"),
        "{job}"
    );
    assert!(
        log(&s, unknown).contains(
            "error: fetching no-such-model failed: \"no-such-model\" is neither a known name"
        ),
        "{}",
        log(&s, unknown)
    );

    let turbo = queue(&s, json!({"kind": "fetch", "repo": "turbo"}));
    let job = s.wait_job(turbo, 120, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(job["state"], "done", "{job}\n{}", log(&s, turbo));
    let output = job["output"].as_str().unwrap();
    assert!(
        output.starts_with("models/hub/models--Tongyi-MAI--Z-Image-Turbo/snapshots/"),
        "{job}"
    );
    let snapshot = root.join(output);
    assert!(snapshot.join("transformer/config.json").is_file());
    // Progress in bytes: everything the snapshot holds was missing, and all of it came.
    let total = bytes_under(&snapshot);
    assert_eq!(
        (job["step"].as_u64(), job["steps"].as_u64()),
        (Some(total), Some(total)),
        "{job}"
    );
    assert_eq!(job["phase"], format!("downloading {TURBO_REPO}"));
    assert!(!elsewhere.exists(), "fetched outside the app's folder");
    let page = s.get("/jobs").text();
    assert!(
        page.contains(&format!("downloading {TURBO_REPO}: ")),
        "{page}"
    );
    let page = s.get(&format!("/jobs/{turbo}")).text();
    assert!(
        page.contains(output) && !page.contains("<h2>Loss"),
        "{page}"
    );

    // The fetched folder is a model path like any other.
    let config = train_config("runs/x", 1, 1, 0).replace("models/tiny", output);
    queue(&s, json!({"kind": "train", "config": config}));
}

#[test]
fn an_experiment_job_runs_to_its_report_and_stops_with_a_checkpoint_and_resumes() {
    let dir = root_with_tiny();
    let s = Server::start(dir.path(), &[]);
    // The training adapter: a LoRA of the tiny model, from a tiny training job.
    let adapter = queue(
        &s,
        json!({"kind": "train", "config": train_config("runs/adapter", 2, 2, 0)}),
    );
    s.wait_job(adapter, 120, state_is("done"));

    let id = queue(
        &s,
        json!({"kind": "experiment", "config": experiment_plan("runs/exp", 4, 2)}),
    );
    let job = s.wait_job(id, 300, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(job["state"], "done", "{job}\n{}", log(&s, id));
    assert_eq!(job["output"], "runs/exp");
    // The last phase: the direct run's validation, all its images rendered.
    assert_eq!(job["phase"], "turbo-direct validating", "{job}");
    assert!(
        job["steps"].as_u64().unwrap() > 0 && job["step"] == job["steps"],
        "{job}"
    );
    let exp = dir.path().join("runs/exp");
    assert!(exp.join("report.html").is_file());
    for way in ["base", "turbo-adapter", "turbo-direct"] {
        assert!(
            exp.join(format!("runs/{way}/lora.safetensors")).is_file(),
            "{way}"
        );
    }
    let text = log(&s, id);
    assert!(
        text.contains("training adapter") && text.contains("checkpoint "),
        "{text}"
    );
    let page = s.get(&format!("/jobs/{id}")).text();
    assert!(
        page.contains("/report/runs/exp/report%2Ehtml\">Experiment report"),
        "{page}"
    );
    // Each way's loss chart (four steps each).
    for way in ["base", "turbo-adapter", "turbo-direct"] {
        assert!(
            page.contains(&format!("<h2>Loss · {way}</h2><svg")),
            "{way}: {page}"
        );
    }
    assert!(s.get("/jobs").text().contains("turbo-direct validating: "));
    // Results: the experiment's folder as its ways and report, beside the adapter's run.
    let results = s.get("/results").text();
    assert!(
        results.contains("exp <span class=\"muted\">(experiment)</span>")
            && results.contains(
                "<a href=\"/runs/exp/arms/base\"><code>base</code></a> \
                 <a href=\"/runs/exp/arms/turbo%2Dadapter\"><code>turbo-adapter</code></a> \
                 <a href=\"/runs/exp/arms/turbo%2Ddirect\"><code>turbo-direct</code></a>"
            )
            && results.contains("href=\"/report/runs/exp/report%2Ehtml\"")
            && results.contains("href=\"/runs/adapter\""),
        "{results}"
    );

    // A long one: stopped in its first training with a checkpoint, resumed from it.
    let long = queue(
        &s,
        json!({"kind": "experiment", "config": experiment_plan("long", 100000, 50)}),
    );
    let training = |j: &Value| j["phase"] == "base training" && j["step"].as_u64() > Some(50);
    s.wait_job(long, 120, training);
    assert_eq!(
        s.request("POST", &format!("/api/jobs/{long}/stop"), &[], b"")
            .status,
        202
    );
    let stopped = s.wait_job(long, 60, |j| j["state"] != "running");
    assert_eq!(
        (stopped["state"].as_str(), &stopped["error"]),
        (Some("stopped"), &Value::Null),
        "{stopped}"
    );
    let base = dir.path().join("long/runs/base");
    let checkpoints = zlora::fsutil::sorted_entries(&base.join("checkpoints")).unwrap();
    let at = stopped["step"].as_u64().unwrap();
    assert!(
        checkpoints
            .iter()
            .any(|c| c.ends_with(format!("step-{at:06}"))),
        "no checkpoint at the stop's step {at}: {checkpoints:?}"
    );
    assert!(!base.join("lora.safetensors").exists() && !base.join("experiment-run.json").exists());

    assert_eq!(
        s.request("POST", &format!("/api/jobs/{long}/resume"), &[], b"")
            .status,
        202
    );
    s.wait_job(long, 120, |j| {
        j["state"] == "running" && j["step"].as_u64() > Some(at)
    });
    assert!(
        log(&s, long).contains(&format!(
            "resumed from {}",
            base.join(format!("checkpoints/step-{at:06}")).display()
        )),
        "{}",
        log(&s, long)
    );
    assert_eq!(
        s.request("POST", &format!("/api/jobs/{long}/stop"), &[], b"")
            .status,
        202
    );
    s.wait_job(long, 60, state_is("stopped"));
}

fn plan(s: &Server, fields: &[(&str, &str)]) -> Reply {
    s.post_form("/api/plan", fields)
}

#[test]
fn the_plan_route_answers_the_verdict_for_the_gpu_rank_and_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    // The default form (Turbo + adapter at 1024 px) on each GPU, rank and storage.
    for (gpu, rank, quantize, fits) in [
        ("4090", "16", "", true),
        ("3060", "16", "", false),
        ("3060", "16", "q4_k", true),
        ("4090", "256", "", false),
    ] {
        let fields = [
            ("action", "fields"),
            ("gpu", gpu),
            ("rank", rank),
            ("quantize", quantize),
        ];
        let r = plan(&s, &fields);
        assert_eq!(r.status, 200, "{fields:?}: {}", r.text());
        let answer = r.json();
        assert_eq!(answer["plans"].as_array().unwrap().len(), 1, "{answer}");
        let p = &answer["plans"][0];
        assert_eq!(p["way"], Value::Null);
        assert_eq!(
            (p["name"].as_str(), p["fits"].as_bool()),
            (Some(gpu), Some(fits)),
            "{fields:?}: {p}"
        );
        let html = answer["html"].as_str().unwrap();
        let label = p["label"].as_str().unwrap();
        let peak = format!("peak {:.1} GiB", p["peak_memory_gib"].as_f64().unwrap());
        let said = if fits { "Fits: " } else { "Does not fit: " };
        assert!(
            html.contains(label) && html.contains(said) && html.contains(&peak),
            "{html}"
        );
        let config = answer["config"].as_str().unwrap();
        assert!(config.contains(&format!("rank = {rank}")), "{config}");
        assert_eq!(
            config.contains("quantize = \"q4_k\""),
            quantize == "q4_k",
            "{config}"
        );
    }
    for (fields, message) in [
        (
            vec![("action", "fields"), ("rank", "abc")],
            "rank must be a whole number",
        ),
        (
            vec![("action", "fields"), ("gpu", "t4")],
            "unknown GPU \"t4\"",
        ),
        (vec![("action", "toml"), ("config", "nonsense")], "config: "),
    ] {
        let r = plan(&s, &fields);
        assert_eq!(r.status, 400, "{fields:?}: {}", r.text());
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(message), "{fields:?}: {error}");
        let html = r.json()["html"].as_str().unwrap().to_string();
        assert!(
            html.contains("id=\"verdict\"") && html.contains(&error.replace('"', "&quot;")),
            "{html}"
        );
    }
    assert_eq!(plan(&s, &[("action", "queue")]).status, 400);

    // The experiment way: the plan of the three ways with the form's settings, each planned.
    let r = plan(
        &s,
        &[
            ("action", "fields"),
            ("way", "experiment"),
            ("gpu", "3060"),
            ("output", "exp"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    let text = answer["config"].as_str().unwrap();
    // The plan as the form wrote it (paths relative to DIR), and as the command reads it.
    ExperimentPlan::parse(Path::new("plan.toml"), text).unwrap();
    let experiment: ArmsPlan = toml::from_str(text).unwrap();
    assert_eq!(
        (
            experiment.base.as_str(),
            experiment.turbo.as_str(),
            experiment.output.to_str()
        ),
        ("models/Z-Image", "models/Z-Image-Turbo", Some("exp"))
    );
    assert!(experiment
        .training_adapter
        .unwrap()
        .ends_with("zimage_turbo_training_adapter_v2.safetensors"));
    assert_eq!(experiment.lora["rank"].as_integer(), Some(16));
    let ways: Vec<&str> = answer["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["way"].as_str().unwrap())
        .collect();
    assert_eq!(ways, ["base", "turbo-adapter", "turbo-direct"]);
    // Each is the plan of that way's training config: the adapter's way needs the most.
    let peaks: Vec<f64> = answer["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peak_memory_gib"].as_f64().unwrap())
        .collect();
    assert!(peaks[1] > peaks[0] && peaks[1] > peaks[2], "{peaks:?}");
    let html = answer["html"].as_str().unwrap();
    assert!(
        html.contains("<h3>turbo-direct</h3>") && html.contains("In all: "),
        "{html}"
    );
    let r = plan(
        &s,
        &[
            ("action", "fields"),
            ("way", "experiment"),
            ("quantize", "fp8"),
        ],
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("an experiment plan has no [model] quantize"));
    // Queued from the page as an experiment job (in the app's folder).
    let queued = s.post_form(
        "/new",
        &[("action", "queue"), ("way", "experiment"), ("config", text)],
    );
    assert_eq!(queued.status, 303, "{}", queued.text());
    let job = s
        .get(
            queued
                .header("location")
                .unwrap()
                .replace("/jobs/", "/api/jobs/")
                .as_str(),
        )
        .json();
    assert_eq!(
        (job["kind"].as_str(), job["output"].as_str()),
        (Some("experiment"), Some("exp")),
        "{job}"
    );
    let cross = s.request(
        "POST",
        "/api/plan",
        &[("Origin", "http://evil.example")],
        b"action=fields",
    );
    assert_eq!(cross.status, 403);
}

#[test]
fn the_new_run_verdict_follows_the_rank_gpu_and_storage_as_they_change_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let mut b = Browser::start(common::chromium());
    b.goto(&format!("http://127.0.0.1:{}/new", s.port));
    let verdict = "document.getElementById('verdict').textContent";
    assert_eq!(b.eval(verdict), "", "no verdict before a change");
    // Set on this page; a reload or a form post would lose it.
    b.eval("window.sameLoad = true");
    let expect = |fields: &[(&str, &str)]| {
        let mut all = vec![("action", "fields")];
        all.extend_from_slice(fields);
        let p = plan(&s, &all).json()["plans"][0].clone();
        let said = if p["fits"] == true {
            "Fits: "
        } else {
            "Does not fit: "
        };
        format!(
            "{said}peak {:.1} GiB",
            p["peak_memory_gib"].as_f64().unwrap()
        )
    };
    let shows = |text: &str| format!("{verdict}.includes({})", json!(text));

    b.type_into("input[name=rank]", "256");
    let big = expect(&[("rank", "256")]);
    assert!(big.starts_with("Does not fit"), "{big}");
    b.wait_for(&shows(&big), 30);
    assert!(b
        .eval("document.querySelector('textarea[name=config]').value")
        .as_str()
        .unwrap()
        .contains("rank = 256"));
    b.type_into("input[name=rank]", "16");
    b.wait_for(&shows(&expect(&[("rank", "16")])), 30);
    b.wait_for(&shows("Fits: "), 1);

    // Selects by keyboard (their popups are not part of the page): the GPU up from the 4090
    // to the 3060 (the table's second), then the last storage, q4_k.
    b.eval("document.querySelector('select[name=gpu]').focus()");
    for _ in 0..3 {
        key(&mut b, "ArrowUp", 38);
    }
    assert_eq!(
        b.eval("document.querySelector('select[name=gpu]').value"),
        "3060"
    );
    b.wait_for(&shows(&expect(&[("gpu", "3060")])), 30);
    b.wait_for(&shows("Does not fit: "), 1);
    b.eval("document.querySelector('select[name=quantize]').focus()");
    key(&mut b, "End", 35);
    assert_eq!(
        b.eval("document.querySelector('select[name=quantize]').value"),
        "q4_k"
    );
    b.wait_for(
        &shows(&expect(&[("gpu", "3060"), ("quantize", "q4_k")])),
        30,
    );
    b.wait_for(&shows("Fits: "), 1);
    assert_eq!(b.eval("window.sameLoad"), true, "the page was reloaded");
}

/// One key press on the focused element.
fn key(b: &mut Browser, key: &str, code: u32) {
    for kind in ["keyDown", "keyUp"] {
        b.call(
            "Input.dispatchKeyEvent",
            json!({"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code}),
        );
    }
}
