//! `zlora serve` at the HTTP level: the start rules, every route, the token, Host and Origin
//! checks, paths that try to leave the app's folder, HTML escaping of user strings, and jobs
//! that train the tiny model as child processes (progress, a clean stop with a checkpoint,
//! resume, one job at a time, a restart that keeps the queue).

mod common;
mod serve_common;

use std::time::Duration;

use serde_json::{json, Value};
use serve_common::{raw_request, root_with_tiny, train_config, validation_plan, Server};

fn submit(s: &Server, config: &str) -> i64 {
    let r = s.post_json("/api/jobs", &json!({"kind": "train", "config": config}));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_i64().unwrap()
}

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |job| job["state"] == state
}

#[test]
fn a_bind_beyond_loopback_without_a_token_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("app");
    let out = common::zlora_env(
        &[
            "serve",
            "--root",
            root.to_str().unwrap(),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("without a token") && err.contains("ZLORA_TOKEN"),
        "{err}"
    );
    assert!(!root.exists(), "nothing is created before the refusal");

    let out = common::zlora(&["serve", "--root", root.to_str().unwrap(), "--token", "a;b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("letters, digits"),
        "{err}"
    );

    // With a token it starts, and makes the folders.
    let s = Server::start(&root, &["--host", "0.0.0.0", "--token", "t0ken"]);
    for sub in ["datasets", "models", "runs", "reports"] {
        assert!(root.join(sub).is_dir(), "{sub}");
    }
    assert_eq!(s.get("/api/health").json(), json!({"ok": true}));
    // A second server on the same folder is refused.
    let out = common::zlora(&["serve", "--root", root.to_str().unwrap(), "--port", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already uses"));
}

#[test]
fn the_token_guards_every_route_but_health_and_the_login_sets_a_strict_cookie() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--token", "s3cret"]);
    assert_eq!(s.get("/api/health").status, 200);
    let routes = [
        ("GET", "/api/jobs"),
        ("POST", "/api/jobs"),
        ("GET", "/api/jobs/1"),
        ("POST", "/api/jobs/1/stop"),
        ("POST", "/api/jobs/1/resume"),
        ("DELETE", "/api/jobs/1"),
        ("GET", "/api/datasets"),
        ("POST", "/api/datasets"),
        ("GET", "/api/datasets/a"),
        ("GET", "/api/datasets/a/preflight"),
        ("PUT", "/api/datasets/a/captions/x.png"),
        ("PUT", "/api/datasets/a/images/x.png"),
        ("DELETE", "/api/datasets/a/images/x.png"),
        ("GET", "/files/datasets/a/x.png"),
        ("GET", "/report/reports/a/report.html"),
    ];
    for (method, path) in routes {
        // The API answers 401; a file, fetched by a page, redirects to the login like a page.
        let refused = if path.starts_with("/api/") { 401 } else { 303 };
        let r = s.request(method, path, &[], b"");
        assert_eq!(r.status, refused, "{method} {path}");
        let wrong = s.request(method, path, &[("Authorization", "Bearer nope")], b"");
        assert_eq!(wrong.status, refused, "{method} {path} with a wrong token");
        let right = s.request(method, path, &[("Authorization", "Bearer s3cret")], b"");
        assert_ne!(right.status, 401, "{method} {path} with the token");
    }
    for page in ["/jobs", "/jobs/1", "/datasets", "/datasets/a", "/"] {
        let r = s.get(page);
        assert_eq!(
            (r.status, r.header("location")),
            (303, Some("/login")),
            "{page}"
        );
    }
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    assert_eq!(
        s.request("POST", "/login", &form, b"token=nope").status,
        401
    );
    let r = s.request("POST", "/login", &form, b"token=s3cret");
    assert_eq!(r.status, 303);
    let cookie = r.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let r = s.request("GET", "/jobs", &[("Cookie", pair)], b"");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("<h1>Jobs</h1>"));
}

#[test]
fn zlora_token_in_the_environment_is_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_zlora"))
        .args([
            "serve",
            "--root",
            tmp.path().to_str().unwrap(),
            "--port",
            "0",
        ])
        .env("ZLORA_TOKEN", "from-env")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    let host = ("Host", format!("127.0.0.1:{port}"));
    let get = |auth: Option<&str>| {
        let mut h = vec![host.clone()];
        h.extend(auth.map(|a| ("Authorization", a.to_string())));
        raw_request(port, "GET", "/api/jobs", &h, b"").status
    };
    assert_eq!(get(None), 401);
    assert_eq!(get(Some("Bearer from-env")), 200);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn other_hosts_and_cross_site_requests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    // DNS rebinding: a page of evil.example whose name now points at 127.0.0.1.
    for host in ["evil.example", &format!("evil.example:{}", s.port)] {
        let r = raw_request(
            s.port,
            "GET",
            "/api/jobs",
            &[("Host", host.to_string())],
            b"",
        );
        assert_eq!(r.status, 403, "Host {host}");
    }
    for host in [format!("localhost:{}", s.port), format!("[::1]:{}", s.port)] {
        let r = raw_request(s.port, "GET", "/api/jobs", &[("Host", host.clone())], b"");
        assert_eq!(r.status, 200, "Host {host}");
    }
    // CSRF: a state-changing request from another site's page.
    let body = json!({"name": "x"}).to_string();
    let post =
        |headers: &[(&str, &str)]| s.request("POST", "/api/datasets", headers, body.as_bytes());
    assert_eq!(post(&[("Origin", "http://evil.example")]).status, 403);
    assert_eq!(post(&[("Sec-Fetch-Site", "cross-site")]).status, 403);
    assert!(!tmp.path().join("datasets/x").exists());
    let own = format!("http://{}", s.host());
    let r = post(&[("Origin", &own), ("Sec-Fetch-Site", "same-origin")]);
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(tmp.path().join("datasets/x").is_dir());
}

#[test]
fn no_path_outside_the_root_is_read_or_written() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let content = b"CONTENT-OUTSIDE-THE-ROOT";
    std::fs::write(outside.path().join("secret.png"), content).unwrap();
    let s = Server::start(&tmp.path().join("app"), &[]);
    let app = tmp.path().join("app");
    let r = s.post_json("/api/datasets", &json!({"name": "d", "tiny": true}));
    assert_eq!(r.status, 201, "{}", r.text());
    std::os::unix::fs::symlink(
        outside.path().join("secret.png"),
        app.join("datasets/d/link.png"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), app.join("datasets/out")).unwrap();
    let secret = outside.path().join("secret.png");
    let abs = secret.to_str().unwrap();
    let paths = [
        "/files/../secret.png".to_string(),
        "/files/datasets/../../secret.png".into(),
        "/files/%2e%2e/secret.png".into(),
        "/files/%2E%2E%2fsecret.png".into(),
        "/files/%252e%252e/secret.png".into(),
        "/files/datasets%2f..%2f..%2fsecret.png".into(),
        "/files/..%5csecret.png".into(),
        format!("/files/{abs}"),
        format!("/files/{}", abs.replace('/', "%2f")),
        "/files/datasets/d/link.png".into(),
        "/files/datasets/out/secret.png".into(),
        "/files/.zlora-serve/jobs.sqlite".into(),
        "/api/datasets/..".into(),
        "/api/datasets/%2e%2e".into(),
        "/api/datasets/out".into(),
        "/datasets/..%2f..".into(),
    ];
    for path in &paths {
        let r = s.get(path);
        assert!((400..500).contains(&r.status), "{path}: {}", r.status);
        assert!(
            !r.body.windows(content.len()).any(|w| w == content),
            "{path} leaked"
        );
    }
    // Writes: captions, uploads and deletes through the same ways out.
    let first = std::fs::read_dir(app.join("datasets/d"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let body = &std::fs::read(first).unwrap();
    for path in [
        "/api/datasets/%2e%2e/images/x.png",
        "/api/datasets/out/images/x.png",
        "/api/datasets/d/images/..%2f..%2fx.png",
        "/api/datasets/d/captions/link.png",
    ] {
        let r = s.request("PUT", path, &[], body);
        assert!((400..500).contains(&r.status), "PUT {path}: {}", r.status);
        let r = s.request("DELETE", path, &[], b"");
        assert!(
            (400..500).contains(&r.status),
            "DELETE {path}: {}",
            r.status
        );
    }
    assert!(!outside.path().join("x.png").exists() && !tmp.path().join("x.png").exists());
    assert!(!outside.path().join("link.txt").exists());
    assert!(secret.exists());
    // A config naming paths outside, in each path field.
    let fields = [
        ("models/tiny", "[model] path", "/etc"),
        ("datasets/tiny", "[dataset] path", "../elsewhere"),
        ("datasets/tiny", "[dataset] path", "datasets/out/x"),
        ("runs/a", "[train] output", "/tmp/zlora-run"),
        ("runs/a", "[train] output", "runs/../../x"),
    ];
    for (good, field, bad) in fields {
        let config =
            train_config("runs/a", 4, 2, 0).replace(&format!("\"{good}\""), &format!("{bad:?}"));
        let r = s.post_json("/api/jobs", &json!({"kind": "train", "config": config}));
        assert_eq!(r.status, 400, "{field} = {bad}: {}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains(field),
            "{}",
            r.text()
        );
    }
    for key in ["training_adapter", "transformer"] {
        let config = train_config("runs/a", 4, 2, 0).replace(
            "base_dtype = \"f32\"",
            &format!("base_dtype = \"f32\"\n{key} = \"/etc/adapter.safetensors\""),
        );
        let r = s.post_json("/api/jobs", &json!({"kind": "train", "config": config}));
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains(&format!("[model] {key}")), "{}", r.text());
    }
    for (key, field) in [
        ("cache_dir", "[dataset] cache_dir"),
        ("masks", "[dataset] masks"),
    ] {
        let config = train_config("runs/a", 4, 2, 0).replace(
            "resolution = 32",
            &format!("resolution = 32\n{key} = \"/tmp\""),
        );
        let r = s.post_json("/api/jobs", &json!({"kind": "train", "config": config}));
        assert!(r.text().contains(field), "{}", r.text());
    }
    assert_eq!(s.get("/api/jobs").json(), json!([]));
}

#[test]
fn datasets_are_listed_captioned_uploaded_and_trashed_with_every_string_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let r = s.post_json("/api/datasets", &json!({"name": "tiny", "tiny": true}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        s.post_json("/api/datasets", &json!({"name": "tiny"}))
            .status,
        409
    );
    let r = s.post_json("/api/datasets", &json!({"name": "other", "tiny": "on"}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!tmp.path().join("datasets/other").exists());
    let list = s.get("/datasets").text();
    assert!(
        list.contains(r#"<input type="checkbox" name="tiny">"#),
        "{list}"
    );
    assert_eq!(
        s.get("/api/datasets").json(),
        json!([{"name": "tiny", "images": 6}])
    );
    let items = s.get("/api/datasets/tiny").json()["items"].clone();
    let first = items[0]["image"].as_str().unwrap().to_string();
    assert!(!items[0]["caption"].as_str().unwrap().is_empty());

    let payload = "<script>alert(1)</script> & \"quotes\"";
    let put = |path: &str, body: &[u8]| s.request("PUT", path, &[], body);
    let r = put(
        &format!("/api/datasets/tiny/captions/{first}"),
        payload.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let caption_file = tmp
        .path()
        .join("datasets/tiny")
        .join(&first)
        .with_extension("txt");
    assert_eq!(std::fs::read_to_string(&caption_file).unwrap(), payload);
    assert_eq!(
        put("/api/datasets/tiny/captions/none.png", b"x").status,
        404
    );
    assert_eq!(
        put(
            &format!("/api/datasets/tiny/captions/{first}"),
            &[0xff, 0xfe]
        )
        .status,
        400
    );

    // Uploads: an image is kept, anything that does not decode is not, nor one too large.
    let png = std::fs::read(tmp.path().join("datasets/tiny").join(&first)).unwrap();
    let evil_name = "%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E.png";
    assert_eq!(
        put(&format!("/api/datasets/tiny/images/{evil_name}"), &png).status,
        201
    );
    assert!(tmp
        .path()
        .join("datasets/tiny/<img src=x onerror=alert(1)>.png")
        .is_file());
    assert_eq!(
        put(&format!("/api/datasets/tiny/images/{evil_name}"), &png).status,
        409
    );
    let r = put(
        "/api/datasets/tiny/images/fake.png",
        b"<html>not an image</html>",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!tmp.path().join("datasets/tiny/fake.png").exists());
    assert_eq!(put("/api/datasets/tiny/images/notes.txt", &png).status, 400);
    let big = vec![0u8; (32 << 20) + 1];
    assert_eq!(put("/api/datasets/tiny/images/big.png", &big).status, 413);
    assert!(!tmp.path().join("datasets/tiny/big.png").exists());

    // Every user string is escaped on the pages.
    let page = s.get("/datasets/tiny");
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;"),
        "{html}"
    );
    assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;.png"));
    assert!(!html.contains("<script>alert") && !html.contains("<img src=x"));
    assert!(s.get("/datasets").text().contains("tiny"));
    let r = s.get(&format!("/files/datasets/tiny/{first}"));
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("image/png"))
    );
    assert_eq!(r.body, png);
    assert_eq!(s.get("/files/datasets/tiny/none.png").status, 404);
    std::fs::write(tmp.path().join("datasets/tiny/notes.html"), "<script>").unwrap();
    assert_eq!(s.get("/files/datasets/tiny/notes.html").status, 403);

    // Delete moves the image and its caption to the trash.
    let r = s.request(
        "DELETE",
        &format!("/api/datasets/tiny/images/{first}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!tmp.path().join("datasets/tiny").join(&first).exists() && !caption_file.exists());
    let trash: Vec<_> = std::fs::read_dir(tmp.path().join("datasets/.trash/tiny"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(trash.len(), 2, "{trash:?}");
    assert!(trash.iter().any(|n| n.ends_with(&first)));
    assert_eq!(s.get("/api/datasets").json()[0]["images"], 6);
}

#[test]
fn job_requests_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let config = train_config("runs/a", 4, 2, 0);
    let bad = [
        json!({"kind": "caption", "config": config}),
        json!({"kind": "validate", "config": config}),
        json!({"kind": "train", "config": validation_plan("runs/a/lora.safetensors", "reports/a")}),
        json!({"kind": "validate", "config": validation_plan("/etc/lora.safetensors", "reports/a")}),
        json!({"kind": "validate", "config": validation_plan("runs/a.safetensors", "../reports")}),
        json!({"kind": "train"}),
        json!({"kind": "train", "config": "[model]\npath = 3"}),
        json!({"kind": "train", "config": config.replace("steps = 4", "steps = 4\ntypo = 1")}),
    ];
    for body in bad {
        let r = s.post_json("/api/jobs", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
    assert_eq!(s.request("POST", "/api/jobs", &[], b"not json").status, 400);
    assert_eq!(s.get("/api/jobs/99").status, 404);
    assert_eq!(s.get("/api/jobs/x").status, 404);
    assert_eq!(s.request("POST", "/api/jobs/99/stop", &[], b"").status, 404);
    assert_eq!(s.get("/jobs/99").status, 404);
    assert_eq!(s.get("/nowhere").status, 404);
    assert_eq!(s.get("/").header("location"), Some("/jobs"));
    let js = s.get("/static/app.js");
    assert_eq!(
        (js.status, js.header("content-type")),
        (200, Some("text/javascript"))
    );
    assert!(s.get("/static/app.css").text().contains("body"));
    let csp = s.get("/jobs");
    assert!(csp
        .header("content-security-policy")
        .unwrap()
        .contains("script-src 'self'"));
}

#[test]
fn jobs_train_one_at_a_time_stop_with_a_checkpoint_and_resume() {
    let dir = root_with_tiny();
    let s = Server::start(dir.path(), &[]);
    let short = submit(&s, &train_config("runs/short", 6, 3, 3));
    let long = submit(&s, &train_config("runs/long", 1_000_000, 1_000_000, 0));
    let list = s.get("/api/jobs").json();
    assert_eq!(list.as_array().unwrap().len(), 2);

    // One at a time: the long job waits while the short one runs.
    let done = s.wait_job(short, 120, |j| {
        let long_state = s.get(&format!("/api/jobs/{long}")).json()["state"].clone();
        if j["state"] == "running" {
            assert_eq!(long_state, "queued");
        }
        j["state"] == "done" || j["state"] == "failed"
    });
    assert_eq!(
        done,
        json!({"id": short, "kind": "train", "state": "done", "step": 6, "steps": 6,
               "output": "runs/short", "rate": done["rate"], "error": null, "phase": null})
    );
    assert!(done["rate"].as_f64().unwrap() > 0.0, "{done}");
    assert!(dir.path().join("runs/short/lora.safetensors").is_file());
    let page = s.get(&format!("/jobs/{short}")).text();
    assert!(
        page.contains("<polyline class=\"smoothed\""),
        "no loss chart"
    );
    assert!(
        page.contains("/files/runs/short/samples/step%2D000006%2Epng"),
        "{page}"
    );
    assert!(s.get("/files/runs/short/samples/step-000006.png").status == 200);
    assert!(page.contains("checkpoint"), "the log shows the checkpoints");
    assert_eq!(
        s.request("POST", &format!("/api/jobs/{short}/stop"), &[], b"")
            .status,
        409
    );
    assert_eq!(
        s.request("POST", &format!("/api/jobs/{short}/resume"), &[], b"")
            .status,
        409
    );

    // The long one runs; a stop finishes its step and writes a checkpoint.
    s.wait_job(long, 120, |j| {
        j["state"] == "running" && j["step"].as_u64() > Some(2)
    });
    let r = s.request("POST", &format!("/api/jobs/{long}/stop"), &[], b"");
    assert_eq!(r.status, 202, "{}", r.text());
    let stopped = s.wait_job(long, 60, |j| j["state"] != "running");
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let at = stopped["step"].as_u64().unwrap();
    let checkpoint = dir
        .path()
        .join(format!("runs/long/checkpoints/step-{at:06}"));
    assert!(
        checkpoint.join("lora.safetensors").is_file(),
        "{}",
        checkpoint.display()
    );

    // Resume continues from that checkpoint.
    let r = s.request("POST", &format!("/api/jobs/{long}/resume"), &[], b"");
    assert_eq!(r.status, 202, "{}", r.text());
    s.wait_job(long, 120, |j| {
        j["state"] == "running" && j["step"].as_u64() > Some(at)
    });
    let log = std::fs::read_to_string(dir.path().join(format!(".zlora-serve/jobs/{long}/log.txt")))
        .unwrap();
    assert!(log.contains(&format!("(step {at})")), "{log}");
    let r = s.request("DELETE", &format!("/api/jobs/{long}"), &[], b"");
    assert_eq!(r.status, 409, "a running job is not deleted: {}", r.text());
    s.request("POST", &format!("/api/jobs/{long}/stop"), &[], b"");
    s.wait_job(long, 60, state_is("stopped"));

    // A validation job of the short run's LoRA: its images are its steps.
    let plan = validation_plan("runs/short/lora.safetensors", "reports/short");
    let r = s.post_json("/api/jobs", &json!({"kind": "validate", "config": plan}));
    assert_eq!(r.status, 201, "{}", r.text());
    let validation = r.json()["id"].as_i64().unwrap();
    let v = s.wait_job(validation, 300, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(v["state"], "done", "{v}");
    assert!(
        v["steps"].as_u64() > Some(0) && v["step"] == v["steps"],
        "{v}"
    );
    assert_eq!(v["output"], "reports/short");
    assert!(dir.path().join("reports/short/report.html").is_file());
    let page = s.get(&format!("/jobs/{validation}")).text();
    assert!(
        page.contains("href=\"/report/reports/short/report%2Ehtml\""),
        "{page}"
    );
    let report = s.get("/report/reports/short/report.html");
    assert_eq!(report.status, 200);
    assert!(report.text().contains("data:image/png;base64,"));
    let policy = report.header("content-security-policy").unwrap();
    assert!(
        policy.starts_with("sandbox;") && !policy.contains("script-src"),
        "{policy}"
    );
    assert_eq!(s.get("/report/reports/short/metrics.json").status, 403);
    assert_eq!(s.get("/report/reports/none/report.html").status, 404);
    assert_eq!(s.get("/report/reports/%2e%2e/report.html").status, 400);

    // Delete removes the job and its log, not its results.
    let r = s.request("DELETE", &format!("/api/jobs/{short}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get(&format!("/api/jobs/{short}")).status, 404);
    assert!(!dir
        .path()
        .join(format!(".zlora-serve/jobs/{short}"))
        .exists());
    assert!(dir.path().join("runs/short/lora.safetensors").is_file());
    let ids: Vec<i64> = s
        .get("/api/jobs")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [validation, long]);
}

#[test]
fn a_restart_keeps_queued_jobs_and_marks_the_running_one_interrupted() {
    let dir = root_with_tiny();
    let s = Server::start(dir.path(), &[]);
    let running = submit(&s, &train_config("runs/a", 1_000_000, 1_000_000, 0));
    let queued = submit(&s, &train_config("runs/b", 1_000_000, 1_000_000, 0));
    s.wait_job(running, 120, |j| j["step"].as_u64() > Some(0));
    s.kill();
    // The orphaned child got SIGTERM (its parent died) and stops with a checkpoint.
    let checkpoints = dir.path().join("runs/a/checkpoints");
    let start = std::time::Instant::now();
    while std::fs::read_dir(&checkpoints).map_or(true, |mut d| d.next().is_none()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint after the server died"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let s = Server::start(dir.path(), &[]);
    let a = s.get(&format!("/api/jobs/{running}")).json();
    assert_eq!(a["state"], "interrupted", "{a}");
    let b = s.get(&format!("/api/jobs/{queued}")).json();
    assert!(b["state"] == "queued" || b["state"] == "running", "{b}");
    // The kept job runs, and the interrupted one resumes after it.
    s.wait_job(queued, 120, |j| j["step"].as_u64() > Some(0));
    let r = s.request("POST", &format!("/api/jobs/{running}/resume"), &[], b"");
    assert_eq!(r.status, 202);
    assert_eq!(
        s.get(&format!("/api/jobs/{running}")).json()["state"],
        "queued"
    );
    s.request("POST", &format!("/api/jobs/{queued}/stop"), &[], b"");
    s.wait_job(queued, 60, state_is("stopped"));
    s.wait_job(running, 120, |j| {
        j["state"] == "running" && j["step"].as_u64() > a["step"].as_u64()
    });
    let log = std::fs::read_to_string(
        dir.path()
            .join(format!(".zlora-serve/jobs/{running}/log.txt")),
    )
    .unwrap();
    assert!(
        log.contains("== resumed ==") && log.contains("resumed from"),
        "{log}"
    );
    s.request("POST", &format!("/api/jobs/{running}/stop"), &[], b"");
    s.wait_job(running, 60, state_is("stopped"));
}

/// An attribute the payloads set on <body> if a browser ever runs them.
const PAYLOAD_IMG: &str = "<img src=x onerror=document.body.dataset.xss=1>";
const PAYLOAD_SCRIPT: &str = "<script>document.body.dataset.xss=2</script>";

/// One Chromium at a time: two at once beside the other tests' trainings starved each other
/// on a 2-core machine.
static BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Headless Chromium on `url` with `mode` (`--dump-dom`, `--screenshot=…`): its stdout once
/// `done` says the run did its work. Headless Chromium on a busy machine sometimes never
/// finishes a load (seen with file:// pages too), so a load is given 90 s and tried up to
/// three times, each with a fresh profile.
fn headless(url: &str, mode: &[&str], done: impl Fn(&str) -> bool) -> String {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    for _ in 0..3 {
        let profile = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("timeout")
            .args(["90", common::chromium()])
            .args(common::HEADLESS)
            .args(mode)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if done(&stdout) {
            return stdout;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    panic!("Chromium did not load {url} in three tries: {last}");
}

/// The DOM of `url` after Chromium loaded it and ran its scripts; `done` is in the whole page.
fn browser_dom(url: &str, done: &str) -> String {
    headless(url, &["--dump-dom"], |dom| dom.contains(done))
}

/// A screenshot of `url` into `png`.
fn screenshot(url: &str, png: &std::path::Path) -> zlora::sample::image::Rgb8 {
    let _ = std::fs::remove_file(png);
    let arg = format!("--screenshot={}", png.display());
    headless(url, &[&arg, "--window-size=1100,1400"], |_| png.is_file());
    zlora::sample::image::read_png(png).unwrap().0
}

/// Where the page screenshots are kept (test artifacts, one of them in docs/).
fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_pages_show_the_loss_chart_the_sample_grids_and_the_dataset_in_chromium() {
    let dir = root_with_tiny();
    let s = Server::start(dir.path(), &[]);
    let id = submit(&s, &train_config("runs/first", 40, 20, 20));
    let job = s.wait_job(id, 300, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(job["state"], "done", "{job}");
    let base = format!("http://{}", s.host());
    let shots = artifacts();

    let page = screenshot(&format!("{base}/jobs/{id}"), &shots.join("job.png"));
    // The chart's smoothed-loss line, drawn in the browser.
    let line = page
        .pixels
        .chunks_exact(3)
        .filter(|p| *p == [0x1f, 0x4e, 0x9c])
        .count();
    assert!(line > 200, "the loss line: {line} pixels");
    // The newest sample grid, found pixel for pixel.
    let (grid, _) =
        zlora::sample::image::read_png(&dir.path().join("runs/first/samples/step-000040.png"))
            .unwrap();
    let patch = common::crop(&grid, grid.width / 2 - 6, grid.height / 2 - 6, 12);
    assert!(
        common::find(&page, &patch, 2).is_some(),
        "the sample grid is on the job page"
    );

    let page = screenshot(&format!("{base}/datasets/tiny"), &shots.join("dataset.png"));
    let (image, _) =
        zlora::sample::image::read_png(&dir.path().join("datasets/tiny/000.png")).unwrap();
    let patch = common::crop(&image, image.width / 2 - 6, image.height / 2 - 6, 12);
    assert!(
        common::find(&page, &patch, 2).is_some(),
        "a dataset image is on its page"
    );
    let jobs = screenshot(&format!("{base}/jobs"), &shots.join("jobs.png"));
    assert!(jobs.pixels.chunks_exact(3).any(|p| p != [255, 255, 255]));
}

#[test]
fn script_payloads_in_every_user_string_never_run_in_a_browser() {
    let dir = root_with_tiny();
    // The detector works: the same payloads, unescaped in a file, do run.
    let control = dir.path().join("control.html");
    std::fs::write(
        &control,
        format!("<body>{PAYLOAD_IMG}{PAYLOAD_SCRIPT}</body>"),
    )
    .unwrap();
    let dom = browser_dom(&format!("file://{}", control.display()), "</body>");
    assert!(
        dom.contains("data-xss="),
        "the payloads run unescaped: {dom}"
    );

    let s = Server::start(dir.path(), &[]);
    // A dataset name, an image name and a caption.
    let name_reply = s.post_json("/api/datasets", &json!({"name": PAYLOAD_IMG, "tiny": true}));
    assert_eq!(name_reply.status, 201, "{}", name_reply.text());
    let png = std::fs::read_dir(dir.path().join("datasets/tiny"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let png = std::fs::read(png).unwrap();
    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    let file = format!("{PAYLOAD_IMG}.png");
    let r = s.request(
        "PUT",
        &format!("/api/datasets/tiny/images/{}", enc(&file)),
        &[],
        &png,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let caption = format!("{PAYLOAD_SCRIPT}{PAYLOAD_IMG}");
    let r = s.request(
        "PUT",
        &format!("/api/datasets/tiny/captions/{}", enc(&file)),
        &[],
        caption.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A caption file without its image, which the dataset check names.
    let orphan = format!("{PAYLOAD_IMG}-orphan.txt");
    std::fs::write(dir.path().join("datasets/tiny").join(&orphan), "alone").unwrap();
    // A prompt and an output folder in a job's config, and a dataset path that makes the job
    // fail with the payload in its error.
    let output = format!("runs/{PAYLOAD_IMG}");
    let config = train_config(&output, 2, 2, 1)
        .replace("a red circle", &format!("{PAYLOAD_SCRIPT}{PAYLOAD_IMG}"))
        .replace(
            "\"datasets/tiny\"",
            &format!("\"datasets/{PAYLOAD_IMG}-missing\""),
        );
    let id = submit(&s, &config);
    let failed = s.wait_job(id, 60, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert!(
        failed["error"].as_str().unwrap().contains("onerror"),
        "{failed}"
    );

    // A run named by the payload whose LoRA's metadata holds both payloads.
    let trained = submit(&s, &train_config("runs/meta", 2, 2, 0));
    s.wait_job(trained, 60, state_is("done"));
    let lora = zlora::lora::LoraFile::read(dir.path().join("runs/meta/lora.safetensors")).unwrap();
    let run = dir.path().join("runs").join(PAYLOAD_IMG);
    std::fs::create_dir_all(&run).unwrap();
    let metadata = zlora::lora::write::Metadata {
        title: Some(format!("{PAYLOAD_SCRIPT}{PAYLOAD_IMG}")),
        ..Default::default()
    };
    zlora::lora::write::save(
        &run.join("lora.safetensors"),
        &lora.modules,
        zlora::lora::Layout::AiToolkit,
        candle_core::DType::F32,
        &metadata,
        false,
    )
    .unwrap();

    let base = format!("http://{}", s.host());
    let pages = [
        "/results".to_string(),
        format!("/runs/{}", enc(PAYLOAD_IMG)),
        format!("/compare?a=meta&b={}&step=2", enc(PAYLOAD_IMG)),
        "/datasets".to_string(),
        format!("/datasets/{}", enc(PAYLOAD_IMG)),
        "/datasets/tiny".into(),
        format!("/jobs/{id}"),
        "/jobs".into(),
        format!("/datasets/{}", enc(&format!("{PAYLOAD_IMG}-none"))),
    ];
    for page in pages {
        let dom = browser_dom(&format!("{base}{page}"), "</main>");
        assert!(
            dom.contains("onerror=document.body"),
            "{page} does not show the payload"
        );
        assert!(!dom.contains("data-xss"), "a payload ran on {page}: {dom}");
    }
    // The dataset check names both payload files, as text.
    let dom = browser_dom(&format!("{base}/datasets/tiny"), "</main>");
    let table = &dom[dom
        .find("<table class=\"preflight\">")
        .expect("the findings")..];
    for file in [format!("{PAYLOAD_IMG}.png"), orphan] {
        let shown = file.replace('<', "&lt;").replace('>', "&gt;");
        assert!(
            table.contains(&format!("<code>{shown}</code>")),
            "{file} is not in the findings: {table}"
        );
    }
}
