//! `zlora serve`: a local web app over the library (docs/serve.md). Datasets, a persistent
//! training queue whose jobs run as child processes of the `zlora` binary, live progress.
//! The library holds no server code; this crate calls what the CLI calls.

mod api;
mod caption;
mod chart;
mod http;
mod jobs;
mod newrun;
mod pages;
mod preflight;
mod results;
mod root;
mod store;

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tiny_http::Method;

use http::{Access, Reply, Request, TOKEN_COOKIE};
use jobs::Jobs;
use results::RunRef;
use root::Root;
use store::Store;

pub struct Options {
    pub root: PathBuf,
    pub host: String,
    pub port: u16,
    pub token: Option<String>,
}

struct App {
    jobs: Arc<Jobs>,
    access: Access,
}

/// Serves until the process ends; prints `listening on http://HOST:PORT` on stdout once
/// requests are taken (with the port chosen when 0 was asked for).
pub fn run(opts: Options) -> anyhow::Result<()> {
    let loopback = check_start(&opts)?;
    let root = Root::open(&opts.root)?;
    let _lock = root.lock()?;
    let store = Store::open(&root.state_dir().join("jobs.sqlite"))?;
    let jobs = Arc::new(Jobs::new(root, store));
    let server = tiny_http::Server::http((opts.host.as_str(), opts.port))
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", opts.host, opts.port))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the server is not on an IP address")?;
    let runner = Arc::clone(&jobs);
    std::thread::spawn(move || runner.run_queue());
    let app = Arc::new(App {
        jobs,
        access: Access {
            loopback,
            token: opts.token,
        },
    });
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    for mut request in server.incoming_requests() {
        let app = Arc::clone(&app);
        std::thread::spawn(move || {
            let reply = app.handle(&mut request);
            // The client may have gone away; nothing to do about it.
            let _ = request.respond(reply.into_response());
        });
    }
    Ok(())
}

/// The start rules: a token, when given, is usable in a header; an address other than
/// loopback needs one. Returns whether the address is loopback.
fn check_start(opts: &Options) -> anyhow::Result<bool> {
    if let Some(t) = &opts.token {
        anyhow::ensure!(
            !t.is_empty()
                && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)),
            "the token (--token or ZLORA_TOKEN) must be letters, digits and - . _ ~ only (it travels in a header and a cookie)"
        );
    }
    let loopback = opts.host.eq_ignore_ascii_case("localhost")
        || opts.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(
        loopback || opts.token.is_some(),
        "refusing to listen on {} without a token: anyone who can reach that address could run jobs and read the folder (rented GPUs expose ports to the internet); set --token or ZLORA_TOKEN, or keep the default --host 127.0.0.1",
        opts.host
    );
    Ok(loopback)
}

impl App {
    fn handle(&self, raw: &mut tiny_http::Request) -> Reply {
        let req = match Request::read(raw) {
            Ok(req) => req,
            Err(reply) => return reply,
        };
        let reply = self.checked(&req).unwrap_or_else(|e| e);
        if req.is_api() || reply.status < 400 || reply.content_type != "application/json" {
            return reply;
        }
        // A page's error as a page.
        let message = serde_json::from_slice::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default();
        Reply::html(reply.status, pages::error_page(reply.status, &message))
    }

    fn checked(&self, req: &Request) -> api::Answer {
        self.access.check_host(req)?;
        self.access.check_origin(req)?;
        let path: Vec<&str> = req.path.iter().map(String::as_str).collect();
        let open = matches!(
            (&req.method, path.as_slice()),
            (Method::Get, ["api", "health"]) | (_, ["login"]) | (Method::Get, ["static", _])
        );
        if !open && !self.access.authorized(req) {
            return Err(if req.is_api() || req.method != Method::Get {
                Reply::error(401, "a token is needed: Authorization: Bearer TOKEN")
            } else {
                Reply::redirect("/login")
            });
        }
        self.route(req, &path)
    }

    fn route(&self, req: &Request, path: &[&str]) -> api::Answer {
        let jobs = &self.jobs;
        let id = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| Reply::error(404, &format!("no job {s:?}")))
        };
        match (&req.method, path) {
            (Method::Get, ["api", "health"]) => {
                Ok(Reply::json(200, &serde_json::json!({"ok": true})))
            }
            (Method::Get, ["api", "jobs"]) => api::list_jobs(jobs),
            (Method::Post, ["api", "jobs"]) => api::create_job(jobs, req),
            (Method::Get, ["api", "jobs", n]) => api::get_job(jobs, id(n)?),
            (Method::Delete, ["api", "jobs", n]) => api::delete_job(jobs, id(n)?),
            (Method::Post, ["api", "jobs", n, "stop"]) => api::stop_job(jobs, id(n)?),
            (Method::Post, ["api", "jobs", n, "resume"]) => api::resume_job(jobs, id(n)?),
            (Method::Post, ["api", "plan"]) => newrun::plan_json(jobs, req),
            (Method::Get, ["api", "datasets"]) => api::list_datasets(jobs),
            (Method::Post, ["api", "datasets"]) => api::create_dataset(jobs, req),
            (Method::Get, ["api", "datasets", name]) => api::get_dataset(jobs, name),
            (Method::Get, ["api", "datasets", name, "preflight"]) => {
                api::preflight(jobs, name, req)
            }
            (Method::Put, ["api", "datasets", name, "captions", file]) => {
                api::put_caption(jobs, name, file, req)
            }
            (Method::Put, ["api", "datasets", name, "images", file]) => {
                api::put_image(jobs, name, file, req)
            }
            (Method::Delete, ["api", "datasets", name, "images", file]) => {
                api::delete_image(jobs, name, file)
            }
            (Method::Get, ["files", ..]) => api::file(jobs, &req.path[1..]),
            (Method::Get, ["report", ..]) => api::report(jobs, &req.path[1..]),
            (Method::Get, [""]) => Ok(Reply::redirect("/jobs")),
            (Method::Get, ["jobs"]) => pages::jobs(jobs),
            (Method::Get, ["jobs", n]) => pages::job(jobs, id(n)?),
            (Method::Get, ["new"]) => newrun::page(jobs),
            (Method::Post, ["new"]) => newrun::post(jobs, req),
            (Method::Get, ["results"]) => results::list(jobs),
            (Method::Get, ["runs", run]) => results::run(jobs, RunRef::Run(run)),
            (Method::Get, ["runs", run, "lora"]) => results::download(jobs, RunRef::Run(run), req),
            (Method::Get, ["runs", set, "arms", arm]) => {
                results::run(jobs, RunRef::Arm { set, arm })
            }
            (Method::Get, ["runs", set, "arms", arm, "lora"]) => {
                results::download(jobs, RunRef::Arm { set, arm }, req)
            }
            (Method::Get, ["compare"]) => results::compare(jobs, req),
            (Method::Get, ["datasets"]) => pages::datasets(jobs),
            (Method::Get, ["datasets", name]) => pages::dataset(jobs, name, req),
            (Method::Get, ["login"]) => Ok(Reply::html(200, pages::login(false))),
            (Method::Post, ["login"]) => Ok(self.login(req)),
            (Method::Get, ["static", "app.js"]) => {
                Ok(asset("text/javascript", include_str!("static/app.js")))
            }
            (Method::Get, ["static", "app.css"]) => {
                Ok(asset("text/css", include_str!("static/app.css")))
            }
            _ => Err(Reply::error(404, "no such page or route")),
        }
    }

    /// The login form's token (`token=…`, form-encoded) sets an HttpOnly, SameSite=Strict
    /// cookie that the pages then send.
    fn login(&self, req: &Request) -> Reply {
        let given = req.form().remove("token").unwrap_or_default();
        if !self.access.token_matches(&given) {
            return Reply::html(401, pages::login(true));
        }
        Reply::redirect("/jobs").with(
            "Set-Cookie",
            format!("{TOKEN_COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"),
        )
    }
}

fn asset(kind: &'static str, text: &str) -> Reply {
    Reply::new(200, kind, text.as_bytes().to_vec())
}
