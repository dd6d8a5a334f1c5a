//! `zlora fetch`: downloads the files zlora needs from a Hugging Face repository into the
//! standard Hub cache (`models--ORG--NAME/blobs/<etag>`, `snapshots/<commit>/<path>` links,
//! `refs/<revision>`), so every tool that reads that cache finds them.
//!
//! One listing request (`/api/models/{repo}/revision/{rev}?blobs=true`) gives the commit and,
//! per file, its size, blob id and for LFS files the sha256. Each file is then fetched from
//! `/{repo}/resolve/{commit}/{path}` into `blobs/<etag>.incomplete`, continuing with an HTTP
//! Range request from what is already there (after a dropped connection, or in a later run),
//! checked (size; sha256 for LFS files, hashed while it streams) and only then renamed into
//! place. A corrupted download is deleted and reported; nothing unverified enters the cache.
//! docs/fetch.md says why this is written on ureq rather than hf-hub's own downloader.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::known::{self, Needed};
use crate::{Error, Result};

/// Where and how to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The Hub's base URL (`HF_ENDPOINT`, default https://huggingface.co).
    pub endpoint: String,
    /// The hub cache folder (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub).
    pub cache_dir: PathBuf,
    /// A branch, tag or commit.
    pub revision: String,
    /// Sent as a bearer token (`HF_TOKEN`), for gated or private repositories.
    pub token: Option<String>,
    /// Attempts per file after a failed transfer, each continuing where the last stopped.
    pub retries: usize,
    /// Wait before the first retry; doubled for each further one.
    pub retry_delay: Duration,
}

impl FetchOptions {
    /// The options the Hugging Face tools take from the environment.
    pub fn from_env(revision: &str) -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        Self {
            endpoint,
            cache_dir: crate::model::folder::hf_cache().path().clone(),
            revision: revision.to_string(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            retries: 5,
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// What the fetch is doing, for progress display.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// The listing is in: `files` to have, `missing_bytes` of them not in the cache yet.
    Listed {
        repo: &'a str,
        commit: &'a str,
        files: usize,
        missing_bytes: u64,
    },
    /// A file starts (or continues from `from` bytes).
    Start {
        path: &'a str,
        size: u64,
        from: u64,
    },
    Progress {
        path: &'a str,
        done: u64,
    },
    /// A transfer failed and will be continued.
    Retry {
        path: &'a str,
        attempt: usize,
        error: &'a str,
    },
    /// A file is in the cache; `downloaded` is false when it already was.
    Done {
        path: &'a str,
        downloaded: bool,
    },
}

/// The result: the snapshot folder holding the files.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    pub repo: String,
    pub commit: String,
    pub snapshot: PathBuf,
    pub files: Vec<String>,
    pub downloaded_bytes: u64,
}

/// The revision listing, as the Hub returns it with `blobs=true`.
#[derive(Debug, Deserialize)]
struct Listing {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    #[serde(alias = "oid")]
    sha256: String,
    size: u64,
}

/// One file to have in the cache.
#[derive(Debug, Clone)]
struct Wanted {
    path: String,
    size: u64,
    /// The blob's name: the sha256 for LFS files, the git blob id otherwise.
    etag: String,
    sha256: Option<String>,
}

/// Fetches what zlora needs of `name` (an alias from [`known::KNOWN`] or an `org/name` id).
pub fn fetch(name: &str, opts: &FetchOptions, events: &mut dyn FnMut(Event)) -> Result<Fetched> {
    let (repo, needed) = known::resolve(name).ok_or_else(|| {
        let aliases: Vec<&str> = known::KNOWN.iter().map(|k| k.alias).collect();
        Error::Invalid(format!(
            "{name:?} is neither a known name ({}) nor a repository id like org/name",
            aliases.join(", ")
        ))
    })?;
    let client = Client::new(opts);
    let listing = client.listing(&repo)?;
    let files = wanted_files(&repo, &listing, needed)?;
    let cache = RepoCache::new(&opts.cache_dir, &repo);
    let missing_bytes = files
        .iter()
        .filter(|f| !cache.has_blob(f))
        .map(|f| f.size)
        .sum();
    events(Event::Listed {
        repo: &repo,
        commit: &listing.sha,
        files: files.len(),
        missing_bytes,
    });
    let mut downloaded_bytes = 0;
    for file in &files {
        let downloaded = if cache.has_blob(file) {
            false
        } else {
            let url = client.file_url(&repo, &listing.sha, &file.path);
            downloaded_bytes += Transfer::new(&client, &cache, file, &url).run(events)?;
            true
        };
        cache.link(&listing.sha, file)?;
        events(Event::Done {
            path: &file.path,
            downloaded,
        });
    }
    if opts.revision != listing.sha {
        cache.write_ref(&opts.revision, &listing.sha)?;
    }
    Ok(Fetched {
        snapshot: cache.snapshot(&listing.sha),
        repo,
        commit: listing.sha,
        files: files.into_iter().map(|f| f.path).collect(),
        downloaded_bytes,
    })
}

/// The files of the listing zlora needs, with their sizes and blob names.
fn wanted_files(repo: &str, listing: &Listing, needed: Needed) -> Result<Vec<Wanted>> {
    if !is_commit(&listing.sha) {
        return Err(Error::Invalid(format!(
            "{repo}: the Hub's listing names commit {:?}, which is not a commit hash",
            listing.sha
        )));
    }
    let has_index = listing
        .siblings
        .iter()
        .any(|s| s.rfilename == "model_index.json");
    let mut files = Vec::new();
    for s in &listing.siblings {
        if !known::wanted(needed, &s.rfilename, has_index) {
            continue;
        }
        files.push(describe(repo, s)?);
    }
    if files.is_empty() {
        return Err(Error::Invalid(format!(
            "{repo}: no file zlora uses in this repository (weights as .safetensors, configs)"
        )));
    }
    if let Needed::Files(expected) = needed {
        if let Some(absent) = expected
            .iter()
            .find(|e| !files.iter().any(|f| f.path == **e))
        {
            return Err(Error::Invalid(format!("{repo}: has no file {absent}")));
        }
    }
    Ok(files)
}

fn describe(repo: &str, s: &Sibling) -> Result<Wanted> {
    let bad =
        |why: &str| Error::Invalid(format!("{repo}: the Hub's entry {:?} {why}", s.rfilename));
    if !is_safe_relative(&s.rfilename) {
        return Err(bad("is not a plain relative path"));
    }
    match (&s.lfs, &s.blob_id, s.size) {
        (Some(lfs), _, _) if is_hex(&lfs.sha256, 64) => Ok(Wanted {
            path: s.rfilename.clone(),
            size: lfs.size,
            etag: lfs.sha256.to_ascii_lowercase(),
            sha256: Some(lfs.sha256.to_ascii_lowercase()),
        }),
        (Some(_), _, _) => Err(bad("has an LFS sha256 that is not 64 hex digits")),
        (None, Some(id), Some(size)) if is_hex(id, 40) || is_hex(id, 64) => Ok(Wanted {
            path: s.rfilename.clone(),
            size,
            etag: id.to_ascii_lowercase(),
            sha256: None,
        }),
        _ => Err(bad("has no size or blob id (listing without blobs=true?)")),
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn is_commit(s: &str) -> bool {
    is_hex(s, 40)
}

/// A path from the server that stays inside the snapshot folder: relative, no `..`, no
/// backslashes or empty parts.
fn is_safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !path.split('/').any(str::is_empty)
}

/// HTTP with the endpoint, token and timeouts of one fetch.
struct Client<'a> {
    agent: ureq::Agent,
    opts: &'a FetchOptions,
}

impl<'a> Client<'a> {
    fn new(opts: &'a FetchOptions) -> Self {
        let config = ureq::Agent::config_builder()
            // Statuses are handled here: 206 vs 200 vs 416 decide how a resume goes on.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            // A stalled connection fails (and is continued) instead of hanging.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("zlora/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent: config.new_agent(),
            opts,
        }
    }

    fn base(&self) -> &str {
        self.opts.endpoint.trim_end_matches('/')
    }

    fn listing(&self, repo: &str) -> Result<Listing> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            self.base(),
            encode(&self.opts.revision, false)
        );
        let mut response = self.get(&url, None)?;
        check_status(response.status().as_u16(), repo, &self.opts.revision)?;
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| transfer_error(&url, &e.to_string()))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{url}: not a Hub revision listing: {e}")))
    }

    fn file_url(&self, repo: &str, commit: &str, path: &str) -> String {
        format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.base(),
            encode(path, true)
        )
    }

    fn get(&self, url: &str, range_from: Option<u64>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut request = self.agent.get(url);
        if let Some(token) = &self.opts.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        if let Some(from) = range_from {
            request = request.header("Range", &format!("bytes={from}-"));
        }
        request
            .call()
            .map_err(|e| transfer_error(url, &e.to_string()))
    }
}

/// The first byte of a 206 answer (`Content-Range: bytes START-END/TOTAL`).
fn range_start(response: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    let value = response.headers().get("content-range")?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn transfer_error(url: &str, msg: &str) -> Error {
    Error::Invalid(format!("{url}: {msg}"))
}

/// A clear message for the statuses a listing can get.
fn check_status(status: u16, repo: &str, revision: &str) -> Result<()> {
    match status {
        200 => Ok(()),
        401 | 403 => Err(Error::Invalid(format!(
            "{repo}: access denied (HTTP {status}); for a gated or private repository accept \
             its terms on the Hub and set HF_TOKEN"
        ))),
        404 => Err(Error::Invalid(format!(
            "{repo}: no such repository or revision {revision:?} (HTTP 404)"
        ))),
        other => Err(Error::Invalid(format!(
            "{repo}: the Hub answered HTTP {other}"
        ))),
    }
}

/// Percent-encodes a revision or a file path (keeping `/` between path segments).
fn encode(s: &str, keep_slash: bool) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b'/' if keep_slash => "/".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One repository's folder in the hub cache.
struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    fn new(cache_dir: &Path, repo: &str) -> Self {
        Self {
            root: cache_dir.join(format!("models--{}", repo.replace('/', "--"))),
        }
    }

    fn blob(&self, file: &Wanted) -> PathBuf {
        self.root.join("blobs").join(&file.etag)
    }

    fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// A blob is named by its content hash and only renamed into place once verified, so one
    /// of the right size is the file.
    fn has_blob(&self, file: &Wanted) -> bool {
        std::fs::metadata(self.blob(file)).is_ok_and(|m| m.is_file() && m.len() == file.size)
    }

    /// `snapshots/<commit>/<path>` → the blob, as a relative symlink (a copy where symlinks
    /// are unavailable).
    fn link(&self, commit: &str, file: &Wanted) -> Result<()> {
        let pointer = self.snapshot(commit).join(&file.path);
        let parent = pointer.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        if pointer.symlink_metadata().is_ok() {
            std::fs::remove_file(&pointer).map_err(|e| Error::io(&pointer, e))?;
        }
        let depth = file.path.matches('/').count() + 2;
        let target: PathBuf = std::iter::repeat_n("..", depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(&file.etag);
        symlink_or_copy(&target, &self.blob(file), &pointer)
    }

    fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if !is_safe_relative(revision) {
            return Err(Error::Invalid(format!(
                "revision {revision:?} cannot name a ref file"
            )));
        }
        let path = self.root.join("refs").join(revision);
        crate::fsutil::write_atomic(&path, commit.as_bytes(), true)
    }
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, _blob: &Path, pointer: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, pointer).map_err(|e| Error::io(pointer, e))
}

#[cfg(not(unix))]
fn symlink_or_copy(_target: &Path, blob: &Path, pointer: &Path) -> Result<()> {
    std::fs::copy(blob, pointer)
        .map(|_| ())
        .map_err(|e| Error::io(pointer, e))
}

/// Downloading one file into `blobs/<etag>.incomplete` and moving it into place.
struct Transfer<'a> {
    client: &'a Client<'a>,
    file: &'a Wanted,
    url: &'a str,
    blob: PathBuf,
    partial: PathBuf,
}

/// The partial file with what is known about its content so far.
struct Partial {
    file: File,
    have: u64,
    /// The sha256 of the bytes written so far (LFS files only).
    hasher: Option<Sha256>,
    /// Bytes this run received.
    received: u64,
}

const CHUNK: usize = 1 << 20;

impl<'a> Transfer<'a> {
    fn new(client: &'a Client, cache: &RepoCache, file: &'a Wanted, url: &'a str) -> Self {
        let blob = cache.blob(file);
        let partial = blob.with_extension("incomplete");
        Self {
            client,
            file,
            url,
            blob,
            partial,
        }
    }

    /// Downloads the file; returns the bytes transferred.
    fn run(&self, events: &mut dyn FnMut(Event)) -> Result<u64> {
        let parent = self.blob.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let lock_path = self.blob.with_extension("lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        // Released when the process ends, however it ends: a crash leaves no stale lock.
        lock.try_lock().map_err(|_| {
            Error::Invalid(format!(
                "{}: another zlora fetch is downloading this file",
                self.file.path
            ))
        })?;
        let mut partial = self.open_partial()?;
        events(Event::Start {
            path: &self.file.path,
            size: self.file.size,
            from: partial.have,
        });
        self.download(&mut partial, events)?;
        let received = partial.received;
        self.finish(partial)?;
        drop(lock);
        // Best effort: a leftover lock file is harmless, the lock itself is gone.
        let _ = std::fs::remove_file(&lock_path);
        Ok(received)
    }

    /// Opens (or creates) the partial file, hashing what an earlier run left in it.
    fn open_partial(&self) -> Result<Partial> {
        let err = |e| Error::io(&self.partial, e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.partial)
            .map_err(err)?;
        let mut have = file.metadata().map_err(err)?.len();
        if have > self.file.size {
            // Longer than the file can be: not a prefix of it.
            file.set_len(0).map_err(err)?;
            have = 0;
        }
        let mut hasher = self.file.sha256.as_ref().map(|_| Sha256::new());
        if let Some(h) = hasher.as_mut() {
            file.seek(SeekFrom::Start(0)).map_err(err)?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut buf).map_err(err)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        Ok(Partial {
            file,
            have,
            hasher,
            received: 0,
        })
    }

    /// Requests the rest of the file until it is all there, continuing after failures.
    fn download(&self, partial: &mut Partial, events: &mut dyn FnMut(Event)) -> Result<()> {
        let opts = self.client.opts;
        let mut attempt = 0;
        let mut delay = opts.retry_delay;
        while partial.have < self.file.size {
            match self.request_rest(partial, events) {
                Ok(()) => {}
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(msg)) if attempt < opts.retries => {
                    attempt += 1;
                    events(Event::Retry {
                        path: &self.file.path,
                        attempt,
                        error: &msg,
                    });
                    std::thread::sleep(delay);
                    delay = delay.saturating_mul(2).min(Duration::from_secs(60));
                }
                Err(Failure::Transient(msg)) => {
                    return Err(Error::Invalid(format!(
                        "{}: download interrupted at {} of {} bytes ({msg}); run the same \
                         command again to continue from there",
                        self.file.path, partial.have, self.file.size
                    )))
                }
            }
        }
        Ok(())
    }

    /// One request for the bytes from `partial.have` on, appended as they arrive.
    fn request_rest(
        &self,
        partial: &mut Partial,
        events: &mut dyn FnMut(Event),
    ) -> std::result::Result<(), Failure> {
        let from = (partial.have > 0).then_some(partial.have);
        let mut response = self
            .client
            .get(self.url, from)
            .map_err(|e| Failure::Transient(e.to_string()))?;
        match response.status().as_u16() {
            206 if from.is_some() && range_start(&response) != from => {
                self.restart(partial).map_err(Failure::Fatal)?;
                return Err(Failure::Transient(
                    "the server answered another range; starting the file over".into(),
                ));
            }
            206 if from.is_some() => {}
            // The server sent the whole file: start over.
            200 => self.restart(partial).map_err(Failure::Fatal)?,
            401 | 403 | 404 => {
                return Err(Failure::Fatal(Error::Invalid(format!(
                    "{}: HTTP {} for {}",
                    self.file.path,
                    response.status().as_u16(),
                    self.url
                ))))
            }
            other => return Err(Failure::Transient(format!("HTTP {other}"))),
        }
        let mut reader = response.body_mut().as_reader();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| Failure::Transient(e.to_string()))?;
            if n == 0 {
                break;
            }
            self.append(partial, &buf[..n]).map_err(Failure::Fatal)?;
            events(Event::Progress {
                path: &self.file.path,
                done: partial.have,
            });
        }
        if partial.have < self.file.size {
            return Err(Failure::Transient("the connection closed early".into()));
        }
        Ok(())
    }

    fn restart(&self, partial: &mut Partial) -> Result<()> {
        partial
            .file
            .set_len(0)
            .map_err(|e| Error::io(&self.partial, e))?;
        partial.have = 0;
        partial.hasher = self.file.sha256.as_ref().map(|_| Sha256::new());
        Ok(())
    }

    fn append(&self, partial: &mut Partial, bytes: &[u8]) -> Result<()> {
        if partial.have + bytes.len() as u64 > self.file.size {
            let _ = std::fs::remove_file(&self.partial);
            return Err(Error::Invalid(format!(
                "{}: the server sent more than the {} bytes the listing gives; the partial \
                 download was deleted",
                self.file.path, self.file.size
            )));
        }
        partial
            .file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.partial, e))?;
        if let Some(h) = partial.hasher.as_mut() {
            h.update(bytes);
        }
        partial.have += bytes.len() as u64;
        partial.received += bytes.len() as u64;
        Ok(())
    }

    /// Verifies the complete file and moves it into place; a mismatch deletes it.
    fn finish(&self, partial: Partial) -> Result<()> {
        partial
            .file
            .sync_all()
            .map_err(|e| Error::io(&self.partial, e))?;
        drop(partial.file);
        if let (Some(expected), Some(hasher)) = (&self.file.sha256, partial.hasher) {
            let got = hex(&hasher.finalize());
            if &got != expected {
                let _ = std::fs::remove_file(&self.partial);
                return Err(Error::Invalid(format!(
                    "{}: sha256 mismatch: the Hub lists {expected}, the download hashes to \
                     {got}; the corrupted file was deleted, run the command again",
                    self.file.path
                )));
            }
        }
        std::fs::rename(&self.partial, &self.blob).map_err(|e| Error::io(&self.blob, e))
    }
}

/// Why a request failed: worth continuing, or not.
enum Failure {
    Transient(String),
    Fatal(Error),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_server_stay_inside_the_snapshot() {
        for ok in ["a.json", "vae/config.json", "x/y/z.safetensors"] {
            assert!(is_safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a\\b",
            "./a",
            "a/",
        ] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }

    #[test]
    fn encoding_keeps_path_separators_only_where_asked() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c.json", true), "a%20b/c.json");
    }
}
