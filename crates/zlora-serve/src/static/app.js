// zlora serve: the live parts of the pages. Everything else is plain server-rendered HTML;
// this only calls the JSON API (docs/serve.md) and reloads the page to show the result, or
// puts a server-rendered fragment in place (the New run page's verdict).
"use strict";

async function call(method, url, body, type) {
  const headers = type ? { "Content-Type": type } : {};
  const r = await fetch(url, { method, body, headers, credentials: "same-origin" });
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try { message = (await r.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return r;
}

function report(err) {
  document.getElementById("status").textContent = err ? err.message : "";
}

// Buttons: data-post / data-delete name an API route; then the page reloads, or goes to
// data-next.
document.addEventListener("click", async (e) => {
  const b = e.target.closest("[data-post],[data-delete]");
  if (!b) return;
  const [method, url] = b.dataset.post ? ["POST", b.dataset.post] : ["DELETE", b.dataset.delete];
  try {
    await call(method, url);
    if (b.dataset.next) location.href = b.dataset.next; else location.reload();
  } catch (err) { report(err); }
});

// Captions (data-put) are saved when the field is left; files (data-upload) are uploaded
// one request each, the image as the body.
document.addEventListener("change", async (e) => {
  const t = e.target;
  try {
    if (t.dataset.put !== undefined) {
      await call("PUT", t.dataset.put, t.value, "text/plain; charset=utf-8");
      t.classList.add("saved");
    } else if (t.dataset.upload !== undefined) {
      for (const f of t.files) {
        await call("PUT", t.dataset.upload + encodeURIComponent(f.name), f, f.type);
      }
      location.reload();
    }
  } catch (err) { report(err); }
});
document.addEventListener("input", (e) => e.target.classList.remove("saved"));

// Forms with data-json post their fields as a JSON object (checkboxes as true/false) and go
// to data-next ({id} filled). A form's named fields shadow its properties (a field named
// "dataset" is form.dataset), so the form's own attributes are read with getAttribute.
document.addEventListener("submit", async (e) => {
  const f = e.target;
  if (!f.hasAttribute("data-json")) return;
  e.preventDefault();
  try {
    const fields = Object.fromEntries(new FormData(f));
    for (const box of f.querySelectorAll("input[type=checkbox]")) fields[box.name] = box.checked;
    const body = JSON.stringify(fields);
    const r = await call("POST", f.getAttribute("action"), body, "application/json");
    const made = await r.json();
    location.href = f.getAttribute("data-next").replace("{id}", made.id);
  } catch (err) { report(err); }
});

// A live job: poll its state and reload the page (chart, samples, log) when it changes, or
// when it is no longer queued or running (it may have ended between the page and the first
// poll, after which nothing changes).
const live = document.querySelector("[data-poll]");
if (live) {
  let last = null;
  setInterval(async () => {
    try {
      const now = await (await call("GET", live.dataset.poll)).text();
      const ended = !["queued", "running"].includes(JSON.parse(now).state);
      if (ended || (last !== null && now !== last)) location.reload();
      last = now;
    } catch (err) { report(err); }
  }, 2000);
}

// New run: as the form changes, it is posted to data-plan (POST /api/plan) and the verdict
// box is replaced by the answer's (server-rendered, escaped). A field's change makes the TOML
// from the fields (and shows it, unless the TOML was edited since); an edit of the TOML
// checks the TOML; the GPU checks whichever was last. The buttons post the whole form as
// before.
const planned = document.querySelector("form[data-plan]");
if (planned) {
  let source = "fields", timer = null, edits = 0, asked = 0;
  const update = async () => {
    const body = new URLSearchParams(new FormData(planned));
    body.set("action", source);
    const [mine, from, editsThen] = [++asked, source, edits];
    try {
      // getAttribute, not .dataset: the form's field named "dataset" shadows that property.
      const r = await fetch(planned.getAttribute("data-plan"), { method: "POST", body, credentials: "same-origin" });
      const answer = await r.json();
      if (mine !== asked) return; // a later change was posted after this one
      if (answer.html === undefined) throw new Error(answer.error || `${r.status} ${r.statusText}`);
      document.getElementById("verdict").outerHTML = answer.html;
      if (r.ok && from === "fields" && edits === editsThen) planned.elements.config.value = answer.config;
      report(null);
    } catch (err) { report(err); }
  };
  planned.addEventListener("input", (e) => {
    if (e.target.name === "config") { source = "toml"; edits++; }
    else if (e.target.name !== "gpu") source = "fields";
    clearTimeout(timer);
    timer = setTimeout(update, 300);
  });
}
