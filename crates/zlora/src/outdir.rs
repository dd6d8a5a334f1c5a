//! Output folders zlora owns. A marker file says zlora made a folder, so that `--force` only
//! ever replaces zlora's own output; a folder that is or contains an input (the config, the
//! dataset, the model, the current directory) is refused whatever the flags; an advisory lock
//! keeps one writer per folder; temporary files of killed writers are removed on the next run
//! ([`crate::fsutil::remove_stale_temps`]).

use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// The marker zlora writes into every output folder it creates (the command and version).
pub const MARKER: &str = ".zlora-output";
/// The lock file: flock'ed by the one process writing into the folder, holding its PID.
pub const LOCK: &str = ".zlora-lock";

/// What a command may do with what is already in its output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Add to it; existing files are refused file by file (no --force).
    Keep,
    /// Overwrite the files the command names (--force): only in a folder zlora made.
    Overwrite,
    /// Remove everything in it first (train/experiment --force): only a folder zlora made.
    Replace,
}

/// An input the output folder must not be or contain: what it is, and its path.
pub type Protected<'a> = (&'a str, &'a Path);

/// An output folder claimed by this process: it holds the lock until dropped.
#[derive(Debug)]
pub struct OutputDir {
    path: PathBuf,
    _lock: std::fs::File,
    /// Temporary files of killed writers that were removed.
    pub cleaned: usize,
}

impl OutputDir {
    /// Checks `out` against the inputs, creates it (with the marker) or checks what is in it
    /// against `policy`, takes the lock (or fails naming the holder's PID), empties it for
    /// [`Policy::Replace`] and removes temporary files of dead writers.
    pub fn claim(
        out: &Path,
        command: &str,
        protected: &[Protected],
        policy: Policy,
    ) -> Result<Self> {
        let path = resolve(out)?;
        refuse_inputs(&path, protected)?;
        let existed = path.exists();
        let owned = is_zloras(&path);
        if !owned && has_files(&path)? && policy != Policy::Keep {
            return Err(not_zloras(&path));
        }
        if let Some(other) = made_by(&path).filter(|c| c != command && policy != Policy::Replace) {
            return Err(Error::bad_file(
                &path,
                format!("was made by `zlora {other}`, not `zlora {command}`: choose another output folder"),
            ));
        }
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        let lock = lock(&path)?;
        if policy == Policy::Replace {
            clear(&path)?;
        }
        // A folder that held someone's files is never marked: --force must not replace it later.
        if !existed || owned || is_empty_but_lock(&path)? {
            let text = format!("{command}\nzlora {}\n", env!("CARGO_PKG_VERSION"));
            crate::fsutil::write_atomic(&path.join(MARKER), text.as_bytes(), true)?;
        }
        let cleaned = crate::fsutil::remove_stale_temps(&path, 3)?;
        Ok(Self {
            path,
            _lock: lock,
            cleaned,
        })
    }

    /// The folder, with `~` expanded.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether zlora made this folder (it holds the marker).
pub fn is_zloras(dir: &Path) -> bool {
    dir.join(MARKER).is_file()
}

/// The command that made this folder, from its marker's first line.
pub fn made_by(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(MARKER)).ok()?;
    text.lines().next().map(str::to_string)
}

/// The error for a folder that has other files and no marker.
pub fn not_zloras(dir: &Path) -> Error {
    Error::bad_file(
        dir,
        format!("exists and was not made by zlora (no {MARKER} in it), so --force will not replace it: choose another output folder"),
    )
}

/// An output path as given, with a leading `~` expanded to $HOME; an empty one is an error.
pub fn resolve(out: &Path) -> Result<PathBuf> {
    if out.as_os_str().is_empty() {
        return Err(Error::Invalid(
            "the output folder is empty: name a folder (e.g. output = \"runs/my-lora\")".into(),
        ));
    }
    let Ok(rest) = out.strip_prefix("~") else {
        return Ok(out.to_path_buf());
    };
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(rest)),
        None => Err(Error::bad_file(
            out,
            "starts with ~ but HOME is not set: give the full path",
        )),
    }
}

/// Refuses an output folder that is, or is an ancestor of, one of the inputs or the current
/// directory ([`OutputDir::claim`] checks this too; a command that decides on the folder's
/// content first calls it before, so the reason given is this one).
pub fn refuse_inputs(out: &Path, protected: &[Protected]) -> Result<()> {
    let cwd = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let out_abs = canonical(out)?;
    let inputs = protected
        .iter()
        .copied()
        .chain([("the current directory", cwd.as_path())]);
    for (what, input) in inputs {
        if canonical(input)?.starts_with(&out_abs) {
            return Err(Error::bad_file(
                out,
                format!(
                    "the output folder is or contains {what} ({}): choose another output folder",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The absolute path with symlinks resolved as far as it exists, and `.`/`..` resolved
/// lexically beyond that.
fn canonical(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).map_err(|e| Error::io(p, e))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other),
                }
            }
            return Ok(out);
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// Whether `dir` exists and holds anything.
pub fn has_files(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .next()
        .is_some())
}

/// Empty apart from a lock file this process just created.
fn is_empty_but_lock(dir: &Path) -> Result<bool> {
    let mut names = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(names.all(|e| e.is_ok_and(|e| e.file_name() == LOCK)))
}

/// Takes the folder's lock without waiting, and writes this process's PID into it.
fn lock(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(LOCK);
    // Not truncated on open: the holder's PID must stay readable for the one who is refused.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    if let Err(e) = file.try_lock() {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let holder = match pid.trim() {
            "" => "another process".to_string(),
            p => format!("process {p}"),
        };
        return Err(match e {
            std::fs::TryLockError::WouldBlock => Error::bad_file(
                dir,
                format!("is in use by another zlora run ({holder}): wait for it to finish or choose another output folder"),
            ),
            std::fs::TryLockError::Error(e) => Error::io(&path, e),
        });
    }
    let io = |e| Error::io(&path, e);
    file.set_len(0).map_err(io)?;
    file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(file)
}

/// Removes everything in the folder except the lock (held by this process).
fn clear(dir: &Path) -> Result<()> {
    for path in crate::fsutil::sorted_entries(dir)? {
        if path.file_name().is_some_and(|n| n == LOCK) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_tilde_is_home_and_empty_is_refused() {
        let home = std::env::var_os("HOME").unwrap();
        assert_eq!(
            resolve(Path::new("~/x")).unwrap(),
            PathBuf::from(home).join("x")
        );
        assert_eq!(resolve(Path::new("a/~")).unwrap(), PathBuf::from("a/~"));
        assert!(resolve(Path::new("")).is_err());
    }

    #[test]
    fn an_output_holding_an_input_is_refused_even_through_dots() {
        let d = tmp();
        let data = d.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        for out in [d.path().to_path_buf(), data.clone(), data.join("..")] {
            let e = refuse_inputs(&out, &[("the dataset", &data)]).unwrap_err();
            assert!(e.to_string().contains("contains the dataset"), "{e}");
        }
        refuse_inputs(&d.path().join("run/../run2"), &[("the dataset", &data)]).unwrap();
    }

    #[test]
    fn force_replaces_only_zloras_folders_and_keeps_the_lock() {
        let d = tmp();
        let user = d.path().join("user");
        std::fs::create_dir_all(&user).unwrap();
        std::fs::write(user.join("thesis.txt"), "mine").unwrap();
        for policy in [Policy::Replace, Policy::Overwrite] {
            let e = OutputDir::claim(&user, "test", &[], policy).unwrap_err();
            assert!(e.to_string().contains("not made by zlora"), "{e}");
        }
        // Adding files is allowed, but the folder is not marked as zlora's.
        drop(OutputDir::claim(&user, "test", &[], Policy::Keep).unwrap());
        assert!(!is_zloras(&user) && user.join("thesis.txt").is_file());

        let run = d.path().join("run");
        drop(OutputDir::claim(&run, "test", &[], Policy::Keep).unwrap());
        assert!(is_zloras(&run));
        std::fs::write(run.join("lora.safetensors"), "old").unwrap();
        let claimed = OutputDir::claim(&run, "test", &[], Policy::Replace).unwrap();
        assert!(!run.join("lora.safetensors").exists() && is_zloras(&run));
        let e = OutputDir::claim(&run, "test", &[], Policy::Keep).unwrap_err();
        let pid = std::process::id().to_string();
        assert!(
            e.to_string().contains("in use") && e.to_string().contains(&pid),
            "{e}"
        );
        drop(claimed);
        OutputDir::claim(&run, "test", &[], Policy::Keep).unwrap();
    }
}
