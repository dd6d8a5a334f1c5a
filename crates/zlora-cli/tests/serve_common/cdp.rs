//! Headless Chromium driven over the DevTools protocol on `--remote-debugging-pipe` (fd 3 in,
//! fd 4 out, NUL-separated JSON): clicks are real mouse events at an element's centre, typing
//! is `Input.insertText` into the focused field, screenshots come from the page. No WebDriver,
//! no websocket, no crate beyond serde_json and libc.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one protocol command may take before the test fails.
const REPLY_WAIT: Duration = Duration::from_secs(60);

pub struct Browser {
    child: Child,
    to: File,
    from: Receiver<Value>,
    next: u64,
    session: String,
    _profile: tempfile::TempDir,
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors it is given room for.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

impl Browser {
    /// Starts Chromium with a fresh profile and opens one page (1100×1400).
    pub fn start(chromium: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (cmd_read, cmd_write) = pipe();
        let (out_read, out_write) = pipe();
        let mut command = Command::new(chromium);
        command
            .args(crate::common::HEADLESS)
            .args(["--window-size=1100,1400", "--remote-debugging-pipe"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The ends
        // are first copied above 10 so that placing one on 3 cannot close the other.
        unsafe {
            command.pre_exec(move || {
                let (r, w) = (
                    libc::fcntl(cmd_read, libc::F_DUPFD, 10),
                    libc::fcntl(out_write, libc::F_DUPFD, 10),
                );
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        // SAFETY: these descriptors are this process's own, each wrapped once.
        let (to, from_file) = unsafe {
            libc::close(cmd_read);
            libc::close(out_write);
            (File::from_raw_fd(cmd_write), File::from_raw_fd(out_read))
        };
        let (send, from) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from_file);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                message.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if send.send(v).is_err() {
                        return;
                    }
                }
                message.clear();
            }
        });
        let mut b = Browser {
            child,
            to,
            from,
            next: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call("Page.enable", json!({}));
        b
    }

    /// One protocol command (on the page's session once attached); its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// One protocol command: its result, or the protocol's error (a page that is being
    /// replaced has no context to evaluate in).
    fn send(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next += 1;
        let id = self.next;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        let deadline = Instant::now() + REPLY_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(reply) if reply["id"] == id => {
                    return match reply["error"].is_null() {
                        true => Ok(reply["result"].clone()),
                        false => Err(reply["error"].clone()),
                    };
                }
                Ok(_event) => {}
                Err(RecvTimeoutError::Timeout) => panic!("{method}: no reply in {REPLY_WAIT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("{method}: Chromium went away"),
            }
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            r["exceptionDetails"].is_null(),
            "{expression}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits until `condition` (a JavaScript expression) is true in the page.
    pub fn wait_for(&mut self, condition: &str, secs: u64) {
        let start = Instant::now();
        let probe = json!({
            "expression": format!("(() => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }})()"),
            "returnByValue": true,
        });
        // A page that is being replaced cannot answer: that is a "not yet".
        while self
            .send("Runtime.evaluate", probe.clone())
            .map(|r| r["result"]["value"].clone())
            != Ok(json!(true))
        {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "not true after {secs} s: {condition}\n{}",
                self.html()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks, then waits for the next page to be loaded (a link, a form post, a redirect).
    pub fn click_to_load(&mut self, selector: &str) {
        self.eval("window.zloraOldPage = true");
        self.click(selector);
        self.wait_for(
            "!window.zloraOldPage && document.readyState === 'complete'",
            60,
        );
    }

    /// The page's URL, from the browser (works on pages that run no script, too). A page
    /// being replaced by one in another renderer (a sandboxed report) answers "Not attached
    /// to an active page" for a moment: asked again until it answers, for up to 10 s.
    pub fn url(&mut self) -> String {
        let mut last = Value::Null;
        for _ in 0..100 {
            match self.send("Page.getNavigationHistory", json!({})) {
                Ok(h) => {
                    let current = h["currentIndex"].as_u64().unwrap() as usize;
                    return h["entries"][current]["url"].as_str().unwrap().to_string();
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("Page.getNavigationHistory: {last}")
    }

    /// The page's HTML, from the DOM domain (works on pages that run no script, too).
    pub fn html(&mut self) -> String {
        let Ok(doc) = self.send("DOM.getDocument", json!({"depth": 0})) else {
            return String::new();
        };
        self.send("DOM.getOuterHTML", json!({"nodeId": doc["root"]["nodeId"]}))
            .map(|r| r["outerHTML"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    }

    /// Loads `url` and waits for the document to be complete.
    pub fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        let check = format!(
            "document.readyState === 'complete' && location.href === {}",
            json!(url)
        );
        self.wait_for(&check, 60);
    }

    /// A left click with the mouse at the centre of the first element `selector` matches
    /// (scrolled into view first).
    pub fn click(&mut self, selector: &str) {
        let sel = json!(selector);
        self.wait_for(&format!("document.querySelector({sel})"), 30);
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); e.scrollIntoView({{block: 'center'}}); \
             const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Clicks a text field, selects what it holds and types `text` over it.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector);
        self.eval(&format!(
            "document.querySelector({}).select()",
            json!(selector)
        ));
        self.call("Input.insertText", json!({"text": text}));
    }

    /// The page as a PNG at `path` (the whole page, not only the window). A page that is
    /// being replaced has no size yet: tried again for up to 10 s.
    pub fn screenshot(&mut self, path: &Path) {
        let params = json!({"format": "png", "captureBeyondViewport": true});
        let start = Instant::now();
        let shot = loop {
            match self.send("Page.captureScreenshot", params.clone()) {
                Ok(shot) => break shot,
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    panic!("{}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        };
        std::fs::write(path, base64_decode(shot["data"].as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the protocol's binary data), padding ignored.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
