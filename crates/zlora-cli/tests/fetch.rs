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

/// The JSON lines of `zlora fetch --events json` (its exit status checked).
fn events(name: &str, server: &HubServer, cache: &Path) -> Vec<serde_json::Value> {
    let out = zlora(&["fetch", name, "--events", "json"], server, cache);
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let parsed: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = &parsed.last().unwrap()["event"];
    assert_eq!(out.status.success(), last == "done", "{lines}");
    parsed
}

#[test]
fn events_json_counts_the_missing_bytes_up_to_the_listing_and_ends_with_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let server = hub(dir.path());
    let cache = dir.path().join("hub");
    let first = events("turbo", &server, &cache);
    let listed = &first[0];
    assert_eq!(
        (listed["event"].as_str(), listed["repo"].as_str()),
        (Some("listed"), Some(TURBO_REPO))
    );
    let total = listed["bytes"].as_u64().unwrap();
    let done: Vec<u64> = first
        .iter()
        .filter(|e| e["event"] == "download")
        .map(|e| {
            assert_eq!(e["total"].as_u64(), Some(total), "{e}");
            e["done"].as_u64().unwrap()
        })
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert_eq!(done.last(), Some(&total));
    let end = first.last().unwrap();
    assert_eq!(end["downloaded_bytes"].as_u64(), Some(total), "{end}");
    let snapshot = PathBuf::from(end["snapshot"].as_str().unwrap());
    assert!(snapshot.starts_with(&cache) && snapshot.join("transformer/config.json").is_file());

    // Again: nothing missing, each file said to be in the cache.
    let again = events("turbo", &server, &cache);
    assert_eq!(again[0]["bytes"], 0);
    assert!(!again.iter().any(|e| e["event"] == "download"));
    let cached = again.iter().filter(|e| {
        e["event"] == "message"
            && e["text"]
                .as_str()
                .unwrap()
                .ends_with("already in the cache")
    });
    assert_eq!(Some(cached.count() as u64), end["files"].as_u64());

    let unknown = events("turbo-xl", &server, &cache);
    assert_eq!(unknown.len(), 1);
    assert!(
        unknown[0]["error"]
            .as_str()
            .unwrap()
            .contains("neither a known name"),
        "{unknown:?}"
    );
}
