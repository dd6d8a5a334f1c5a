//! `hub::fetch` against a local Hub (tests/hub_server): the cache layout other tools read,
//! only the files zlora needs, resuming after a dropped connection (in the same run and in a
//! later one), a corrupted download refused, a server ignoring Range, and no second download.

mod hub_server;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hub_server::{Fault, HubServer};
use sha2::{Digest, Sha256};
use zlora::hub::fetch::{fetch, Event, FetchOptions, Fetched};
use zlora::model::folder::ModelFolder;
use zlora::model::tiny::{create, TinySpec};

const REPO: &str = "tiny-org/tiny-zimage";
const WEIGHTS: &str = "transformer/diffusion_pytorch_model.safetensors";

/// Files a real model repository has that zlora must not download.
const NOT_NEEDED: [(&str, &[u8]); 5] = [
    ("README.md", b"# tiny"),
    (".gitattributes", b"*.safetensors filter=lfs"),
    ("assets/showcase.png", b"\x89PNG not really"),
    ("tokenizer/merges.txt", b"a b"),
    ("transformer/diffusion_pytorch_model.bin", b"pickle"),
];

struct Setup {
    server: HubServer,
    dir: tempfile::TempDir,
    commit: String,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("published");
        create(&model, &TinySpec::default(), false).unwrap();
        let server = HubServer::start();
        let commit = server.add_repo(REPO, &model, &NOT_NEEDED);
        Self {
            server,
            dir,
            commit,
        }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("hub")
    }

    fn options(&self, retries: usize) -> FetchOptions {
        FetchOptions {
            endpoint: self.server.endpoint.clone(),
            cache_dir: self.cache(),
            revision: "main".into(),
            token: None,
            retries,
            retry_delay: Duration::from_millis(10),
        }
    }

    fn fetch(&self, retries: usize) -> zlora::Result<(Fetched, Vec<String>)> {
        let mut log = Vec::new();
        let fetched = fetch(REPO, &self.options(retries), &mut |e| {
            if let Event::Retry { path, .. } = e {
                log.push(format!("retry {path}"));
            }
        })?;
        Ok((fetched, log))
    }

    fn repo_dir(&self) -> PathBuf {
        self.cache().join("models--tiny-org--tiny-zimage")
    }

    fn published(&self, path: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("published").join(path)).unwrap()
    }

    /// The Range headers of the downloads of `path`.
    fn ranges(&self, path: &str) -> Vec<Option<String>> {
        self.server
            .take_seen()
            .into_iter()
            .filter(|s| s.path.ends_with(&format!("/{path}")))
            .map(|s| s.range)
            .collect()
    }
}

fn sha256(bytes: &[u8]) -> String {
    hub_server::hex(&Sha256::digest(bytes))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_tiny_pipeline_lands_in_the_hub_cache_layout_and_loads_from_there() {
    let s = Setup::new();
    let (fetched, _) = s.fetch(0).unwrap();
    assert_eq!(fetched.commit, s.commit);
    let snapshot = s.repo_dir().join("snapshots").join(&s.commit);
    assert_eq!(fetched.snapshot, snapshot);
    let refs = std::fs::read_to_string(s.repo_dir().join("refs/main")).unwrap();
    assert_eq!(refs, s.commit);

    // Weights are LFS blobs named by their sha256, linked relatively from the snapshot.
    let weights = s.published(WEIGHTS);
    let link = snapshot.join(WEIGHTS);
    let target = std::fs::read_link(&link).unwrap();
    assert!(target.is_relative(), "{}", target.display());
    assert_eq!(
        target,
        Path::new("../../../blobs").join(sha256(&weights)),
        "link of {WEIGHTS}"
    );
    assert_eq!(std::fs::read(&link).unwrap(), weights);

    // Exactly the files zlora reads; nothing else was even requested.
    let seen: Vec<String> = s.server.take_seen().into_iter().map(|r| r.path).collect();
    for (skipped, _) in NOT_NEEDED {
        assert!(!seen.iter().any(|p| p.ends_with(skipped)), "{skipped}");
        assert!(!snapshot.join(skipped).exists(), "{skipped}");
    }
    assert!(fetched
        .files
        .contains(&"tokenizer/tokenizer.json".to_string()));
    assert!(fetched
        .files
        .contains(&"scheduler/scheduler_config.json".to_string()));

    // What hf-hub's cache lookup (and so ModelFolder::open by repo id) reads.
    let cache = hf_hub::Cache::new(s.cache());
    let index = cache.model(REPO.into()).get("model_index.json").unwrap();
    let folder = ModelFolder::open(index.parent().unwrap().to_str().unwrap()).unwrap();
    assert_eq!(
        folder.transformer_config().unwrap().dim,
        TinySpec::default().dim
    );
    // No partial or lock files are left behind.
    let leftovers: Vec<PathBuf> = files_under(&s.repo_dir().join("blobs"))
        .into_iter()
        .filter(|p| p.extension().is_some())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_dropped_connection_is_continued_with_a_range_request() {
    let s = Setup::new();
    s.server.set_fault(WEIGHTS, Fault::DropHalfway { times: 2 });
    let (fetched, log) = s.fetch(3).unwrap();
    assert_eq!(
        log,
        vec![format!("retry {WEIGHTS}"), format!("retry {WEIGHTS}")]
    );
    let ranges = s.ranges(WEIGHTS);
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[0], None);
    // Each continuation starts where the last one stopped, never at 0.
    let starts: Vec<usize> = ranges[1..]
        .iter()
        .map(|r| {
            let r = r.as_deref().unwrap();
            r.trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap()
        })
        .collect();
    let size = s.published(WEIGHTS).len();
    assert!(
        starts[0] > 0 && starts[0] < size && starts[1] > starts[0],
        "{starts:?}"
    );
    assert_eq!(
        std::fs::read(fetched.snapshot.join(WEIGHTS)).unwrap(),
        s.published(WEIGHTS)
    );
}

#[test]
fn an_interrupted_run_is_continued_by_the_next_run() {
    let s = Setup::new();
    s.server.set_fault(WEIGHTS, Fault::DropHalfway { times: 1 });
    let err = s.fetch(0).unwrap_err().to_string();
    assert!(
        err.contains(WEIGHTS) && err.contains("run the same command again"),
        "{err}"
    );
    let blob = s
        .repo_dir()
        .join("blobs")
        .join(sha256(&s.published(WEIGHTS)));
    let partial = blob.with_extension("incomplete");
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0, "the partial download must be kept");
    s.server.take_seen();

    let (fetched, _) = s.fetch(0).unwrap();
    let ranges = s.ranges(WEIGHTS);
    assert_eq!(ranges, vec![Some(format!("bytes={kept}-"))]);
    assert!(!partial.exists());
    assert_eq!(
        std::fs::read(fetched.snapshot.join(WEIGHTS)).unwrap(),
        s.published(WEIGHTS)
    );
}

#[test]
fn a_corrupted_download_fails_verification_and_leaves_nothing_behind() {
    let s = Setup::new();
    s.server.set_fault(WEIGHTS, Fault::Corrupt);
    let err = s.fetch(2).unwrap_err().to_string();
    assert!(
        err.contains(WEIGHTS) && err.contains("sha256 mismatch"),
        "{err}"
    );
    let blob = s
        .repo_dir()
        .join("blobs")
        .join(sha256(&s.published(WEIGHTS)));
    assert!(!blob.exists());
    assert!(!blob.with_extension("incomplete").exists());
    assert!(!s
        .repo_dir()
        .join("snapshots")
        .join(&s.commit)
        .join(WEIGHTS)
        .exists());

    // Once the server sends the right bytes, the same command succeeds.
    s.server.clear_faults();
    s.fetch(0).unwrap();
}

#[test]
fn a_server_ignoring_range_restarts_the_file_instead_of_appending() {
    let s = Setup::new();
    s.server.set_fault(WEIGHTS, Fault::DropHalfway { times: 1 });
    s.fetch(0).unwrap_err();
    s.server.set_fault(WEIGHTS, Fault::IgnoreRange);
    let (fetched, _) = s.fetch(0).unwrap();
    assert_eq!(
        std::fs::read(fetched.snapshot.join(WEIGHTS)).unwrap(),
        s.published(WEIGHTS)
    );
}

#[test]
fn files_already_in_the_cache_are_not_downloaded_again() {
    let s = Setup::new();
    s.fetch(0).unwrap();
    s.server.take_seen();
    let (fetched, _) = s.fetch(0).unwrap();
    assert_eq!(fetched.downloaded_bytes, 0);
    let seen = s.server.take_seen();
    assert!(
        seen.iter().all(|r| r.path.starts_with("/api/")),
        "only the listing is requested: {seen:?}"
    );
}

#[test]
fn unknown_names_and_repositories_are_clear_errors() {
    let s = Setup::new();
    let opts = s.options(0);
    let err = fetch("not a repo", &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("turbo") && err.contains("org/name"), "{err}");
    let err = fetch("nobody/nothing", &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nobody/nothing") && err.contains("404"),
        "{err}"
    );
}
