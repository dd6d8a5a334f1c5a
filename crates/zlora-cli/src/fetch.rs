//! `zlora fetch base|turbo|adapter|distill-patch|qwen3-vl-{2b,4b,8b}|REPO_ID [--revision R]
//! [--events json]`: downloads what zlora needs into the Hugging Face cache and prints the
//! snapshot folder (docs/fetch.md).

use anyhow::Context;
use indicatif::ProgressBar;
use zlora::hub::fetch::{fetch, Event, FetchOptions};

use crate::events::{self, EventFormat, FetchEvents};
use crate::progress::bytes_bar;

#[derive(clap::Args)]
pub struct Args {
    /// base, turbo, adapter, distill-patch, qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b, or a repository id (org/name).
    name: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Print progress as JSON lines on stdout (listed, download, then done or failed)
    /// instead of bars; docs/serve.md lists the events.
    #[arg(long, value_enum)]
    events: Option<EventFormat>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Some(EventFormat::Json) = a.events else {
        return run_with_bars(a);
    };
    let opts = FetchOptions::from_env(&a.revision);
    let mut sink = FetchEvents::default();
    let result = fetch(&a.name, &opts, &mut |event| sink.show(event))
        .with_context(|| format!("fetching {} failed", a.name));
    match &result {
        Ok(f) => events::done(serde_json::json!({
            "snapshot": f.snapshot,
            "repo": f.repo,
            "commit": f.commit,
            "files": f.files.len(),
            "downloaded_bytes": f.downloaded_bytes,
        })),
        Err(e) => events::failed(e),
    }
    result.map(drop)
}

fn run_with_bars(a: Args) -> anyhow::Result<()> {
    let opts = FetchOptions::from_env(&a.revision);
    eprintln!(
        "{} @ {} from {} into {}",
        a.name,
        a.revision,
        opts.endpoint,
        opts.cache_dir.display()
    );
    let mut bar: Option<ProgressBar> = None;
    let fetched = fetch(&a.name, &opts, &mut |event| match event {
        Event::Listed {
            repo,
            commit,
            files,
            missing_bytes,
        } => eprintln!(
            "{repo} at commit {commit}: {files} files, {:.2} GB to download",
            missing_bytes as f64 / 1e9
        ),
        Event::Start { path, size, from } => {
            let b = bytes_bar(size, path.to_string());
            b.set_position(from);
            b.reset_eta();
            bar = Some(b);
        }
        Event::Progress { done, .. } => {
            if let Some(b) = &bar {
                b.set_position(done);
            }
        }
        Event::Retry {
            path,
            attempt,
            error,
        } => {
            if let Some(b) = &bar {
                b.println(format!("{path}: {error}; continuing (attempt {attempt})"));
            }
        }
        Event::Done { path, downloaded } => {
            if let Some(b) = bar.take() {
                b.finish();
            }
            if !downloaded {
                eprintln!("{path}: already in the cache");
            }
        }
    })
    .with_context(|| format!("fetching {} failed", a.name))?;
    eprintln!(
        "{} files in {} ({:.2} GB downloaded)",
        fetched.files.len(),
        fetched.snapshot.display(),
        fetched.downloaded_bytes as f64 / 1e9
    );
    println!("{}", fetched.snapshot.display());
    Ok(())
}
