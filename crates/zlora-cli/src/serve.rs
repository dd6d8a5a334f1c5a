//! `zlora serve --root DIR [--host 127.0.0.1] [--port 7860] [--token T]`: the local web app
//! (crates/zlora-serve, docs/serve.md).

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The app's folder: datasets/, models/, runs/ and reports/ (created when missing). No
    /// path outside it is ever read or written.
    #[arg(long)]
    root: PathBuf,
    /// The address to listen on; any but loopback needs a token.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Requests need `Authorization: Bearer TOKEN` (pages: a login). Default: $ZLORA_TOKEN.
    #[arg(long)]
    token: Option<String>,
    /// Make `zlora demo` in the folder first (unless an earlier demo made it): its dataset,
    /// models, run and validation report are then in the app.
    #[arg(long)]
    demo: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.demo && zlora::outdir::made_by(&a.root).as_deref() != Some(crate::demo::COMMAND) {
        anyhow::ensure!(
            !zlora::outdir::has_files(&a.root)?,
            "{}: --demo makes the demo in a new or empty folder, or opens one `zlora demo` made; this one holds other files: choose another --root",
            a.root.display()
        );
        crate::demo::make(&a.root, false)?;
    }
    zlora_serve::run(zlora_serve::Options {
        root: a.root,
        host: a.host,
        port: a.port,
        token: a.token.or_else(|| std::env::var("ZLORA_TOKEN").ok()),
    })
}
