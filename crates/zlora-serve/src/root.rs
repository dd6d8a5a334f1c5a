//! DIR, the one folder the app reads and writes. Every path that comes from a request or a
//! submitted config goes through here, and is refused unless it stays inside DIR: no `..`, no
//! absolute path elsewhere, no symbolic link that leads out, and no encoded form of these.

use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use percent_encoding::percent_decode_str;

/// The folders DIR holds (created when missing).
pub const SUBDIRS: [&str; 4] = ["datasets", "models", "runs", "reports"];

/// The app's own state (the job database, each job's config and log), hidden from URLs.
const STATE_DIR: &str = ".zlora-serve";

/// A path refused: the message says which and why (a 4xx answer).
#[derive(Debug)]
pub struct Refused(pub String);

pub struct Root {
    /// Canonical: no symbolic links, so containment is a prefix test.
    dir: PathBuf,
}

impl Root {
    /// Creates DIR and its folders when missing.
    pub fn open(dir: &Path) -> anyhow::Result<Root> {
        for sub in SUBDIRS.iter().chain([&STATE_DIR]) {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p)
                .with_context(|| format!("cannot create {} (check --root)", p.display()))?;
        }
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve --root {}", dir.display()))?;
        Ok(Root { dir })
    }

    /// Holds the app's folder for this server while the returned file is open: a second
    /// server on the same folder would run jobs beside this one's and mark them interrupted.
    pub fn lock(&self) -> anyhow::Result<std::fs::File> {
        use std::os::unix::io::AsRawFd;
        let path = self.state_dir().join("server.lock");
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        let held = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
        anyhow::ensure!(
            !held,
            "another zlora serve already uses {}: stop it first, or choose another --root",
            self.dir.display()
        );
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(STATE_DIR)
    }

    /// DIR-relative form of a path inside DIR, as the API shows it.
    pub fn relative(&self, p: &Path) -> String {
        p.strip_prefix(&self.dir)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    }

    /// The file or folder that URL segments (still percent-encoded) name under `base`.
    pub fn url_path(&self, base: &str, raw: &[&str]) -> Result<PathBuf, Refused> {
        let mut p = self.dir.join(base);
        for r in raw {
            p.push(segment(r)?);
        }
        self.no_link_out(&p)?;
        Ok(p)
    }

    /// A path field of a submitted config: relative to DIR, or absolute inside it. For a
    /// `model` field (a model or adapter to read), links under models/ to folders elsewhere
    /// (a Hugging Face cache) are the operator's and are followed; everywhere else a link that
    /// leads out of DIR is refused.
    pub fn config_path(&self, field: &str, value: &Path, model: bool) -> Result<PathBuf, Refused> {
        let refuse = |why: &str| {
            Refused(format!(
                "{field} = {:?} {why}: paths must stay inside the app's folder (relative paths are read from it)",
                value.display().to_string()
            ))
        };
        if value.components().any(|c| c == Component::ParentDir) {
            return Err(refuse("contains \"..\""));
        }
        let joined = self.dir.join(value);
        if !joined.starts_with(&self.dir) || joined == self.dir {
            return Err(refuse("is outside"));
        }
        if !(model && joined.starts_with(self.dir.join("models"))) {
            self.no_link_out(&joined)
                .map_err(|_| refuse("leads out through a symbolic link"))?;
        }
        Ok(joined)
    }

    /// Refuses a path whose nearest existing ancestor (itself included) resolves outside DIR.
    fn no_link_out(&self, p: &Path) -> Result<(), Refused> {
        let existing = p.ancestors().find(|a| a.exists()).unwrap_or(&self.dir);
        match existing.canonicalize() {
            Ok(real) if real.starts_with(&self.dir) => Ok(()),
            _ => Err(Refused(format!(
                "{} leads out of the app's folder through a symbolic link",
                self.relative(p)
            ))),
        }
    }
}

/// One decoded URL segment that can only name an entry of a folder: not empty, no separator,
/// no leading dot (`.`, `..`, hidden files such as the app's own state), and no `%` left after
/// decoding (a double-encoded `..` or separator).
pub fn segment(raw: &str) -> Result<String, Refused> {
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| Refused(format!("{raw:?} is not UTF-8 once decoded")))?;
    if decoded.is_empty()
        || decoded.starts_with('.')
        || decoded.contains(['/', '\\', '\0', '%'])
        || decoded.chars().any(char::is_control)
    {
        return Err(Refused(format!(
            "{decoded:?} is not a plain file or folder name"
        )));
    }
    Ok(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_refuse_every_way_out() {
        for raw in [
            "..",
            ".",
            "",
            "%2e%2e",
            "%2E%2E",
            "%252e%252e",
            "a%2fb",
            "a%5cb",
            "%2fetc",
            ".hidden",
            "a%00b",
            "%c0%ae",
        ] {
            assert!(segment(raw).is_err(), "{raw:?} accepted");
        }
        assert_eq!(segment("a%20b.png").unwrap(), "a b.png");
    }

    #[test]
    fn config_paths_stay_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let inside = root
            .config_path("[dataset] path", Path::new("datasets/a"), false)
            .unwrap();
        assert_eq!(inside, root.path().join("datasets/a"));
        let abs = root.path().join("runs/x");
        assert_eq!(
            root.config_path("[train] output", &abs, false).unwrap(),
            abs
        );
        for bad in ["../x", "datasets/../../x", "/etc", ""] {
            assert!(
                root.config_path("[train] output", Path::new(bad), false)
                    .is_err(),
                "{bad:?} accepted"
            );
        }
        std::os::unix::fs::symlink("/tmp", root.path().join("datasets/out")).unwrap();
        let err = root
            .config_path("[dataset] path", Path::new("datasets/out/x"), false)
            .unwrap_err();
        assert!(err.0.contains("symbolic link"), "{}", err.0);
        std::os::unix::fs::symlink("/tmp", root.path().join("models/cache")).unwrap();
        root.config_path("[model] path", Path::new("models/cache/m"), true)
            .unwrap();
        assert!(root
            .config_path("[dataset] path", Path::new("models/cache/m"), false)
            .is_err());
    }
}
