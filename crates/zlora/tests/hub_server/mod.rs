//! A tiny Hugging Face Hub on 127.0.0.1 for the fetch tests: the revision listing
//! (`/api/models/{repo}/revision/{rev}?blobs=true`) and file downloads
//! (`/{repo}/resolve/{rev}/{path}`) with Range support, plus faults on demand: a connection
//! dropped half-way, a corrupted body, a server that ignores Range. Shared with the CLI tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// A fault the server injects into downloads of one file.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Send half of the requested bytes, then close the connection (`times` requests).
    DropHalfway { times: usize },
    /// Flip the bytes of the body (same length) on every request.
    Corrupt,
    /// Answer Range requests with the whole file (200).
    IgnoreRange,
}

/// One request the server saw: the path and the Range header.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    faults: BTreeMap<String, Fault>,
    seen: Vec<Seen>,
}

#[derive(Clone)]
struct Repo {
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
}

pub struct HubServer {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

/// Files at or above this size are listed as LFS files (as git-lfs tracks weights).
const LFS_MIN: usize = 1024;

impl HubServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // One connection at a time: the fetch is sequential.
                let _ = serve(stream, &shared);
            }
        });
        Self { endpoint, state }
    }

    /// Publishes every file under `dir` (relative paths) plus `extra` files as `repo`.
    pub fn add_repo(&self, repo: &str, dir: &Path, extra: &[(&str, &[u8])]) -> String {
        let mut files = BTreeMap::new();
        collect(dir, dir, &mut files);
        for (path, bytes) in extra {
            files.insert(path.to_string(), bytes.to_vec());
        }
        let commit = hex(&Sha256::digest(repo.as_bytes()))[..40].to_string();
        self.state.lock().unwrap().repos.insert(
            repo.to_string(),
            Repo {
                commit: commit.clone(),
                files,
            },
        );
        commit
    }

    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .insert(path.to_string(), fault);
    }

    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// Requests seen so far, then forgets them.
    pub fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.state.lock().unwrap().seen)
    }
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            out.insert(rel, std::fs::read(&path).unwrap());
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The git blob id of `bytes` (sha1 of "blob <len>\0" + bytes on the Hub); any stable 40-hex
/// name serves the tests, so a truncated sha256 stands in.
fn blob_id(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(format!("blob {}\0", bytes.len()));
    h.update(bytes);
    hex(&h.finalize())[..40].to_string()
}

fn listing(repo: &Repo) -> String {
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(path, bytes)| {
            let mut entry = serde_json::json!({
                "rfilename": path, "size": bytes.len(), "blobId": blob_id(bytes)
            });
            if bytes.len() >= LFS_MIN {
                entry["lfs"] = serde_json::json!({
                    "sha256": hex(&Sha256::digest(bytes)), "size": bytes.len(), "pointerSize": 134
                });
            }
            entry
        })
        .collect();
    serde_json::json!({"id": "x", "sha": repo.commit, "siblings": siblings}).to_string()
}

/// Reads one request and answers it; the connection closes after each answer.
fn serve(mut stream: TcpStream, state: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let (repos, fault) = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
        });
        let fault = resolve_path(&path).and_then(|(_, f)| s.faults.get(&f).cloned());
        if let Some(Fault::DropHalfway { times }) = &fault {
            let f = resolve_path(&path).unwrap().1;
            if *times <= 1 {
                s.faults.remove(&f);
            } else {
                s.faults.insert(f, Fault::DropHalfway { times: times - 1 });
            }
        }
        (s.repos.clone(), fault)
    };
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo, _rev)) = rest.split_once("/revision/") else {
            return respond(&mut stream, 404, &[], b"");
        };
        return match repos.get(repo) {
            Some(r) => respond(&mut stream, 200, &[], listing(r).as_bytes()),
            None => respond(&mut stream, 404, &[], b"{}"),
        };
    }
    let Some((repo, file)) = resolve_path(&path) else {
        return respond(&mut stream, 404, &[], b"");
    };
    let Some(bytes) = repos.get(&repo).and_then(|r| r.files.get(&file)) else {
        return respond(&mut stream, 404, &[], b"");
    };
    send_file(&mut stream, bytes, range.as_deref(), fault)
}

/// `/{org}/{name}/resolve/{rev}/{path}` → (repo, path).
fn resolve_path(path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    match parts[..] {
        [org, name, "resolve", _rev, file] => Some((format!("{org}/{name}"), file.to_string())),
        _ => None,
    }
}

fn send_file(
    stream: &mut TcpStream,
    bytes: &[u8],
    range: Option<&str>,
    fault: Option<Fault>,
) -> std::io::Result<()> {
    let start = range
        .filter(|_| fault != Some(Fault::IgnoreRange))
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
    let etag = hex(&Sha256::digest(bytes));
    let mut body = bytes[start.unwrap_or(0).min(bytes.len())..].to_vec();
    if fault == Some(Fault::Corrupt) {
        body.iter_mut().for_each(|b| *b ^= 0x5a);
    }
    let content_range = start.map(|s| format!("bytes {s}-{}/{}", bytes.len() - 1, bytes.len()));
    let mut headers = vec![
        ("ETag", format!("\"{etag}\"")),
        ("X-Linked-Etag", format!("\"{etag}\"")),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    if let Some(cr) = content_range {
        headers.push(("Content-Range", cr));
    }
    let status = if start.is_some() { 206 } else { 200 };
    if let Some(Fault::DropHalfway { .. }) = fault {
        let head = head(status, &headers, body.len());
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body[..body.len() / 2])?;
        stream.flush()?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    respond(stream, status, &headers, &body)
}

fn head(status: u16, headers: &[(&str, String)], len: usize) -> String {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        _ => "Not Found",
    };
    let mut text =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    stream.write_all(head(status, headers, body.len()).as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}
