//! A `zlora serve` process for the tests, and a raw HTTP/1.1 client: raw, so that paths reach
//! the server exactly as written (a client library would normalise `..` away).
#![allow(dead_code)]

pub mod cdp;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    pub root: PathBuf,
    pub port: u16,
    child: Child,
}

impl Server {
    /// Starts `zlora serve --root ROOT --port 0 EXTRA...` and waits for its address.
    pub fn start(root: &Path, extra: &[&str]) -> Server {
        Self::start_env::<&str>(root, extra, &[])
    }

    /// [`Server::start`] with environment variables set for the server (and its jobs).
    pub fn start_env<V: AsRef<std::ffi::OsStr>>(
        root: &Path,
        extra: &[&str],
        env: &[(&str, V)],
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_zlora"))
            .args(["serve", "--root", root.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .env_remove("ZLORA_TOKEN")
            .envs(env.iter().map(|(k, v)| (k, v.as_ref())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Server {
            root: root.to_path_buf(),
            port,
            child,
        }
    }

    /// Ends the server at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A request with the right Host and `headers`; (status, headers, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut all = vec![("Host", self.host())];
        all.extend(headers.iter().map(|(k, v)| (*k, v.to_string())));
        raw_request(self.port, method, path, &all, body)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], b"")
    }

    /// Every one of `paths` (traversal attempts) is refused with a 4xx.
    pub fn assert_refused(&self, paths: &[&str]) {
        for path in paths {
            let status = self.get(path).status;
            assert!((400..500).contains(&status), "{path}: {status}");
        }
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// A form post (`application/x-www-form-urlencoded`) of `fields`, as a browser sends one.
    pub fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.join("&").as_bytes(),
        )
    }

    /// Polls job `id` for up to `secs`: whether `done` came to hold of it.
    pub fn wait_job_for(&self, id: i64, secs: u64, done: impl Fn(&Value) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if done(&self.get(&format!("/api/jobs/{id}")).json()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Polls job `id` until `done` holds of it (or fails after `secs`).
    pub fn wait_job(&self, id: i64, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let job = self.get(&format!("/api/jobs/{id}")).json();
            if done(&job) {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "job {id} did not get there in {secs} s: {job}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request as written and reads the whole reply.
pub fn raw_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a reply head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

pub fn percent_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `[dataset]`, `[lora]` and `[train]` tables (without `output`) of a tiny run on the
/// dataset at datasets/tiny, shared by train configs and experiment plans.
pub fn tiny_run_tables(steps: u64, save_every: u64) -> String {
    format!(
        r#"[dataset]
path = "datasets/tiny"
resolution = 32

[lora]
rank = 2
alpha = 2

[train]
steps = {steps}
learning_rate = 1e-3
batch_size = 2
save_every = {save_every}
"#
    )
}

/// A train config for the tiny model at models/tiny and dataset at datasets/tiny.
pub fn train_config(output: &str, steps: u64, save_every: u64, sample_every: u64) -> String {
    format!(
        r#"[model]
path = "models/tiny"
variant = "turbo"
base_dtype = "f32"

{}output = "{output}"

[sample]
every = {sample_every}
prompts = ["a red circle"]
seeds = [1]
"#,
        tiny_run_tables(steps, save_every)
    )
}

/// A validation plan of `lora` on the tiny model as Base and Turbo, into `output`.
pub fn validation_plan(lora: &str, output: &str) -> String {
    format!(
        r#"lora = "{lora}"
base = "models/tiny"
turbo = "models/tiny"
output = "{output}"

[render]
prompts = ["a red circle"]
seeds = [1]
width = 32
height = 32
"#
    )
}

/// A folder with the tiny model at models/tiny and a six-image dataset at datasets/tiny.
pub fn root_with_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    crate::common::stderr(&crate::common::zlora(&[
        "tiny-model",
        "--out",
        &p("models/tiny"),
        "--dim",
        "32",
    ]));
    crate::common::stderr(&crate::common::zlora(&[
        "tiny-dataset",
        "--out",
        &p("datasets/tiny"),
        "--count",
        "6",
        "--size",
        "32",
    ]));
    dir
}
