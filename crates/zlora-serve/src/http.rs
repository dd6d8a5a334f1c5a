//! Requests and replies over tiny_http, and the checks every request passes before routing:
//! the Host header (DNS rebinding), the origin of state-changing requests (CSRF), the token.

use std::collections::HashMap;
use std::io::Read;

use serde_json::{json, Value};
use tiny_http::{Header, Method};

/// The largest request body: an uploaded image (anything larger is refused unread).
pub const MAX_BODY: u64 = 32 << 20;

pub struct Request {
    pub method: Method,
    /// The path's segments, still percent-encoded (decoded only by `root::segment`).
    pub path: Vec<String>,
    /// The query string's fields, decoded.
    pub query: HashMap<String, String>,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// Reads a request; a body over [`MAX_BODY`] is an error reply.
    pub fn read(req: &mut tiny_http::Request) -> Result<Request, Reply> {
        if req.body_length().is_some_and(|n| n as u64 > MAX_BODY) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        req.as_reader()
            .take(MAX_BODY + 1)
            .read_to_end(&mut body)
            .map_err(|e| Reply::error(400, &format!("cannot read the request body: {e}")))?;
        if body.len() as u64 > MAX_BODY {
            return Err(too_large());
        }
        let url = req.url();
        let path = url.split(['?', '#']).next().unwrap_or_default();
        let query = url
            .split('#')
            .next()
            .and_then(|u| u.split_once('?'))
            .map_or_else(HashMap::new, |(_, q)| form_fields(q));
        Ok(Request {
            method: req.method().clone(),
            path: path.split('/').skip(1).map(str::to_string).collect(),
            query,
            headers: req
                .headers()
                .iter()
                .map(|h| {
                    (
                        h.field.as_str().as_str().to_ascii_lowercase(),
                        h.value.to_string(),
                    )
                })
                .collect(),
            body,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_api(&self) -> bool {
        self.path.first().is_some_and(|s| s == "api")
    }

    fn changes_state(&self) -> bool {
        !matches!(self.method, Method::Get | Method::Head | Method::Options)
    }

    /// The fields of an `application/x-www-form-urlencoded` body (the last of a repeated name).
    pub fn form(&self) -> HashMap<String, String> {
        form_fields(&String::from_utf8_lossy(&self.body))
    }

    pub fn json(&self) -> Result<Value, Reply> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Reply::error(400, &format!("the request body is not JSON: {e}")))
    }

    /// A cookie's value.
    fn cookie(&self, name: &str) -> Option<&str> {
        self.header("cookie")?
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

fn too_large() -> Reply {
    Reply::error(
        413,
        &format!("the request body is over {} MiB", MAX_BODY >> 20),
    )
}

/// The name of the cookie that holds the token after a login.
pub const TOKEN_COOKIE: &str = "zlora_token";

/// Who may talk to the server.
pub struct Access {
    /// Bound to a loopback address: only loopback host names are this server.
    pub loopback: bool,
    pub token: Option<String>,
}

impl Access {
    /// The Host header, when bound to loopback, must be a loopback name: a page of another
    /// site whose name an attacker points at 127.0.0.1 (DNS rebinding) sends its own name.
    /// Bound elsewhere, a token is required and the cookie is the site's own.
    pub fn check_host(&self, req: &Request) -> Result<(), Reply> {
        if !self.loopback {
            return Ok(());
        }
        let host = req.header("host").unwrap_or_default();
        if is_loopback_host(host) {
            Ok(())
        } else {
            Err(Reply::error(
                403,
                &format!("Host {host:?} is not this server's (it listens on loopback: use http://127.0.0.1 or http://localhost)"),
            ))
        }
    }

    /// A state-changing request from a browser must come from this site's own pages: its
    /// Origin (when sent) names the Host it was sent to, and Sec-Fetch-Site (when sent) says
    /// same-origin. Clients that are not browsers send neither.
    pub fn check_origin(&self, req: &Request) -> Result<(), Reply> {
        if !req.changes_state() {
            return Ok(());
        }
        let host = req.header("host").unwrap_or_default();
        if let Some(origin) = req.header("origin") {
            let own = ["http://", "https://"]
                .iter()
                .any(|scheme| origin.strip_prefix(scheme) == Some(host));
            if !own {
                return Err(Reply::error(
                    403,
                    &format!("cross-site request refused: Origin {origin:?} is not this site"),
                ));
            }
        }
        match req.header("sec-fetch-site") {
            Some(site) if site != "same-origin" && site != "none" => Err(Reply::error(
                403,
                &format!("cross-site request refused (Sec-Fetch-Site: {site})"),
            )),
            _ => Ok(()),
        }
    }

    /// With a token, a request must carry it: `Authorization: Bearer T`, or the cookie a login
    /// set.
    pub fn authorized(&self, req: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let bearer = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "));
        [bearer, req.cookie(TOKEN_COOKIE)]
            .into_iter()
            .flatten()
            .any(|given| same(given.as_bytes(), token.as_bytes()))
    }

    pub fn token_matches(&self, given: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| same(given.as_bytes(), t.as_bytes()))
    }
}

/// `name` or `name:port` of a loopback address.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The pages' policy: scripts and styles only from this server's own files (so that an
/// escaping mistake still could not run an injected script), no framing.
const PAGE_POLICY: &str =
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
     frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// A validation report's policy: its own inline styles and data: images, no script at all,
/// and a sandbox (an origin of its own, so it could not use the app's cookie either).
const REPORT_POLICY: &str =
    "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'";

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    policy: &'static str,
}

impl Reply {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type,
            body,
            headers: Vec::new(),
            policy: PAGE_POLICY,
        }
    }

    /// A validation report's self-contained HTML, under [`REPORT_POLICY`].
    pub fn report(html: Vec<u8>) -> Reply {
        Reply {
            policy: REPORT_POLICY,
            ..Reply::new(200, "text/html; charset=utf-8", html)
        }
    }

    pub fn json(status: u16, value: &Value) -> Reply {
        Reply::new(status, "application/json", value.to_string().into_bytes())
    }

    pub fn html(status: u16, page: maud::Markup) -> Reply {
        Reply::new(
            status,
            "text/html; charset=utf-8",
            page.into_string().into_bytes(),
        )
    }

    /// An error as JSON (`{"error": …}`); pages turn it into HTML in `respond`.
    pub fn error(status: u16, msg: &str) -> Reply {
        Reply::json(status, &json!({ "error": msg }))
    }

    pub fn redirect(to: &str) -> Reply {
        Reply::new(303, "text/plain", Vec::new()).with("Location", to.to_string())
    }

    pub fn with(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// The tiny_http response, with the headers every answer carries: no sniffing, no
    /// framing, no caching, and its content security policy.
    pub fn into_response(self) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
        let fixed = [
            ("Content-Type", self.content_type.to_string()),
            ("X-Content-Type-Options", "nosniff".into()),
            ("X-Frame-Options", "DENY".into()),
            // Not "no-referrer": under it Chromium sends `Origin: null` with a form's POST,
            // which the CSRF check must refuse. "same-origin" sends nothing to other sites.
            ("Referrer-Policy", "same-origin".into()),
            ("Cache-Control", "no-store".into()),
            ("Content-Security-Policy", self.policy.into()),
        ];
        let mut response = tiny_http::Response::from_data(self.body).with_status_code(self.status);
        for (name, value) in fixed.into_iter().chain(self.headers) {
            if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
                response.add_header(h);
            }
        }
        response
    }
}

/// The fields of `application/x-www-form-urlencoded` text (a body or a query string).
fn form_fields(text: &str) -> HashMap<String, String> {
    text.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect()
}

/// A value of an `application/x-www-form-urlencoded` body.
fn form_decode(v: &str) -> String {
    percent_encoding::percent_decode_str(&v.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost:7860",
            "127.0.0.1:1",
            "[::1]:7860",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example:7860",
            "",
            "127.0.0.1.evil.example",
            "0.0.0.0:7860",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
