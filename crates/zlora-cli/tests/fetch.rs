//! `zlora fetch` end to end against a local Hub (HF_ENDPOINT), into a private HF cache
//! (HF_HUB_CACHE): the aliases, the printed snapshot, `zlora plan` seeing the fetched model,
//! and clear failures. Nothing here can reach the real Hub: every run sets HF_ENDPOINT.

#[path = "../../zlora/tests/hub_server/mod.rs"]
mod hub_server;

mod common;

use common::{stdout, zlora_env};
use std::path::{Path, PathBuf};
use std::process::Output;

use hub_server::HubServer;
use zlora::hub::known::{DISTILL_PATCH_FILE, DISTILL_PATCH_REPO, TURBO_REPO};

fn zlora(args: &[&str], server: &HubServer, cache: &Path) -> Output {
    zlora_env(
        args,
        &[
            ("HF_ENDPOINT", server.endpoint.as_ref()),
            ("HF_HUB_CACHE", cache.as_os_str()),
        ],
    )
}

/// A local Hub serving a tiny model as Z-Image-Turbo and a fake DistillPatch.
fn hub(dir: &Path) -> HubServer {
    let model = dir.join("published");
    zlora::model::tiny::create(&model, &zlora::model::tiny::TinySpec::default(), false).unwrap();
    let server = HubServer::start();
    server.add_repo(TURBO_REPO, &model, &[("README.md", b"# turbo")]);
    let patch = dir.join("patch");
    std::fs::create_dir_all(&patch).unwrap();
    std::fs::write(patch.join(DISTILL_PATCH_FILE), vec![7u8; 4096]).unwrap();
    server.add_repo(DISTILL_PATCH_REPO, &patch, &[]);
    server
}

#[test]
fn fetched_models_are_what_plan_and_the_cache_lookup_find() {
    let dir = tempfile::tempdir().unwrap();
    let server = hub(dir.path());
    let cache = dir.path().join("hub");

    let snapshot = PathBuf::from(stdout(&zlora(&["fetch", "turbo"], &server, &cache)));
    assert!(snapshot.starts_with(&cache), "{}", snapshot.display());
    assert!(snapshot.join("transformer/config.json").is_file());
    assert!(!snapshot.join("README.md").exists());
    stdout(&zlora(&["fetch", "distill-patch"], &server, &cache));

    // A turbo-direct config naming the repo id: plan reads the fetched (tiny) model and
    // finds the DistillPatch in the cache, so nothing is left to download.
    let config = dir.path().join("direct.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = \"{TURBO_REPO}\"\nvariant = \"turbo\"\n[dataset]\npath = \"d\"\n\
             resolution = 64\n[lora]\nrank = 2\nalpha = 2\n[train]\nsteps = 1\n\
             learning_rate = 1e-3\noutput = \"o\"\n"
        ),
    )
    .unwrap();
    let json = stdout(&zlora(
        &["plan", config.to_str().unwrap(), "--json"],
        &server,
        &cache,
    ));
    let plan: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(plan["download_gb"].as_f64(), Some(0.0), "{json}");
    assert!(plan["model"].as_str().unwrap().contains("local folder"));
}

#[test]
fn failures_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let server = hub(dir.path());
    let cache = dir.path().join("hub");
    for (name, expected) in [
        ("turbo-xl", "neither a known name"),
        ("someone/missing", "404"),
        ("adapter", "404"),
    ] {
        let out = zlora(&["fetch", name], &server, &cache);
        assert!(!out.status.success(), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{name}: {err}");
    }
}
