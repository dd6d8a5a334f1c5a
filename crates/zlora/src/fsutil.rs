//! Writes that never leave a half-written file and never replace a user's file by surprise.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Largest text input read (configs, plans, captions, JSON): far above any real one, and a
/// bound on what a wrong path (a log, a disk image) can make us read.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// Checks that `path` is a regular file (following symlinks) of at most `max_bytes`, before
/// anything reads it: a device (`/dev/zero`) would be read until memory runs out and a FIFO
/// would block forever. Returns the file's size.
pub fn check_regular(path: &Path, max_bytes: u64) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a folder"
        } else {
            "a device, FIFO or socket"
        };
        return Err(Error::bad_file(
            path,
            format!("is {what}, not a regular file"),
        ));
    }
    if meta.len() > max_bytes {
        return Err(Error::bad_file(
            path,
            format!(
                "is {} bytes; the limit for this kind of file is {max_bytes}",
                meta.len()
            ),
        ));
    }
    Ok(meta.len())
}

/// The bytes of a regular file (see [`check_regular`]) of any size.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    check_regular(path, u64::MAX)?;
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The UTF-8 text of a regular file of at most [`MAX_TEXT_BYTES`].
pub fn read_text(path: &Path) -> Result<String> {
    check_regular(path, MAX_TEXT_BYTES)?;
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Writes `bytes` to `path` through a temporary file in the same folder, fsync and rename,
/// so a crash leaves either the old file or the new one (and the temporary file, which the
/// next write of `path` removes once its writer is gone). An existing file is an error unless
/// `overwrite` is set.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    write_atomic_with(path, overwrite, |w| {
        w.write_all(bytes).map_err(|e| Error::io(path, e))
    })
}

/// [`write_atomic`] for content produced piece by piece: `fill` writes into the temporary
/// file; if it fails the temporary file is removed and `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    overwrite: bool,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    check_new(path, overwrite)?;
    let dir = folder_of(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_stale_temps_of(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Refuses an existing `path` unless `overwrite` is set (what every atomic write checks;
/// a long write checks it before its work too).
pub fn check_new(path: &Path, overwrite: bool) -> Result<()> {
    if !overwrite && path.exists() {
        return Err(Error::bad_file(
            path,
            "already exists (pass --force to overwrite it)",
        ));
    }
    Ok(())
}

/// The folder a file path is in (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Checks before any work that `path` can be written: not a folder, and its folder exists
/// (it is created) and takes a file (a probe named like a temporary file is made and removed).
pub fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::bad_file(path, "is a folder: name a file to write"));
    }
    let dir = folder_of(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(format!(".zlora-probe.tmp{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| Error::io(dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))
}

/// The PID in a temporary file's name (`.NAME.tmpPID`, see [`crate::fsutil::write_atomic`]).
fn temp_pid(name: &str) -> Option<u32> {
    let (stem, pid) = name.strip_prefix('.')?.rsplit_once(".tmp")?;
    (!stem.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        .then(|| pid.parse().ok())?
}

/// Removes the temporary files of writers that are no longer running, in `dir` and its
/// folders `depth` levels down (symlinks are not followed); returns how many.
pub fn remove_stale_temps(dir: &Path, depth: usize) -> Result<usize> {
    let mut removed = 0;
    for path in sorted_entries(dir)? {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() && depth > 0 {
            removed += remove_stale_temps(&path, depth - 1)?;
        } else if meta.is_file() && is_stale_temp(&path, None) {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes the temporary files of dead writers of one output file (`.NAME.tmpPID` beside it).
pub fn remove_stale_temps_of(file: &Path) -> Result<usize> {
    let dir = folder_of(file);
    if !dir.is_dir() {
        return Ok(0);
    }
    let name = file.file_name().and_then(|n| n.to_str());
    let mut removed = 0;
    for path in sorted_entries(dir)? {
        if path.is_file() && is_stale_temp(&path, name) {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A temporary file (of the output `of`, if given) whose writer is not running.
fn is_stale_temp(path: &Path, of: Option<&str>) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let belongs = of.is_none_or(|of| {
        name.strip_prefix(&format!(".{of}.tmp"))
            .is_some_and(|pid| !pid.is_empty())
    });
    belongs && temp_pid(name).is_some_and(|pid| !process_alive(pid))
}

/// Whether a process with this PID exists (signal 0 checks without sending anything).
#[cfg(unix)]
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for the process; it has no other effect.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Without a way to ask, every writer counts as running: nothing is removed.
#[cfg(not(unix))]
pub fn process_alive(_pid: u32) -> bool {
    true
}

/// Name, dtype and shape of one tensor of a streamed safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: candle_core::DType,
    pub shape: Vec<usize>,
}

/// Writes a safetensors file one tensor at a time (atomically): `tensor(i)` is called for
/// `specs[i]` only when its bytes are due, so a checkpoint larger than memory can be written.
/// Each produced tensor must match its spec.
pub fn write_safetensors_with(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &std::collections::BTreeMap<String, String>,
    overwrite: bool,
    mut tensor: impl FnMut(usize) -> Result<candle_core::Tensor>,
) -> Result<()> {
    let header = safetensors_header(path, specs, metadata)?;
    write_atomic_with(path, overwrite, |w| {
        let io = |e| Error::io(path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for (i, spec) in specs.iter().enumerate() {
            let t = tensor(i)?;
            if t.dtype() != spec.dtype || t.dims() != spec.shape.as_slice() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor {} came out as {:?} {:?}, planned {:?} {:?}",
                        spec.name,
                        t.dtype(),
                        t.dims(),
                        spec.dtype,
                        spec.shape
                    ),
                ));
            }
            w.write_all(&safetensors::View::data(&t)).map_err(io)?;
        }
        Ok(())
    })
}

/// The JSON header with data offsets, padded with spaces to a multiple of 8 bytes as the
/// safetensors writer does.
fn safetensors_header(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut offset = 0usize;
    for s in specs {
        let name = match s.dtype {
            candle_core::DType::F32 => "F32",
            candle_core::DType::BF16 => "BF16",
            candle_core::DType::F16 => "F16",
            other => {
                return Err(Error::bad_file(
                    path,
                    format!("tensor {} has dtype {other:?}, not f32/bf16/f16", s.name),
                ))
            }
        };
        let bytes = s.shape.iter().product::<usize>() * s.dtype.size_in_bytes();
        let entry = serde_json::json!({"dtype": name, "shape": s.shape, "data_offsets": [offset, offset + bytes]});
        map.insert(s.name.clone(), entry);
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| Error::bad_file(path, format!("cannot encode the header: {e}")))?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    Ok(json)
}

/// Saves named tensors as a safetensors file (atomically), with optional header metadata.
pub fn save_safetensors(
    path: &Path,
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
    overwrite: bool,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter(), metadata)
        .map_err(|e| Error::bad_file(path, format!("cannot serialise tensors: {e}")))?;
    write_atomic(path, &bytes, overwrite)
}

/// The paths in a folder, sorted (read_dir's order depends on the file system).
pub fn sorted_entries(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?;
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PID that no process has: above the kernel's limit (pid_max is at most 2^22).
    const DEAD_PID: u32 = 99_999_999;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn temp_names_give_their_pid() {
        assert_eq!(temp_pid(".lora.safetensors.tmp123"), Some(123));
        assert_eq!(temp_pid("lora.safetensors.tmp123"), None);
        assert_eq!(temp_pid(".lora.tmp"), None);
        assert_eq!(temp_pid(".lora.tmp12x"), None);
        assert_eq!(temp_pid(".tmp5"), None);
    }

    #[test]
    fn only_dead_writers_temp_files_are_removed() {
        let d = tmp();
        let dead = d.path().join(format!(".a.bin.tmp{DEAD_PID}"));
        let alive = d.path().join(format!(".a.bin.tmp{}", std::process::id()));
        let user = d.path().join("notes.tmp1");
        for p in [&dead, &alive, &user] {
            std::fs::write(p, "x").unwrap();
        }
        assert!(process_alive(std::process::id()) && !process_alive(DEAD_PID));
        assert_eq!(remove_stale_temps(d.path(), 0).unwrap(), 1);
        assert!(!dead.exists() && alive.exists() && user.exists());
    }

    #[test]
    fn temps_of_one_file_leave_other_files_temps_alone() {
        let d = tmp();
        let mine = d.path().join(format!(".out.safetensors.tmp{DEAD_PID}"));
        let other = d.path().join(format!(".other.tmp{DEAD_PID}"));
        for p in [&mine, &other] {
            std::fs::write(p, "x").unwrap();
        }
        assert_eq!(
            remove_stale_temps_of(&d.path().join("out.safetensors")).unwrap(),
            1
        );
        assert!(!mine.exists() && other.exists());
    }

    #[test]
    fn streamed_files_read_back() -> Result<()> {
        use candle_core::{DType, Device, Tensor};
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = dir.path().join("s.safetensors");
        let tensors = [
            Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?,
            Tensor::new(&[5f32, 6.0, 7.0], &Device::Cpu)?.to_dtype(DType::BF16)?,
        ];
        let specs: Vec<TensorSpec> = ["a", "b"]
            .iter()
            .zip(&tensors)
            .map(|(n, t)| TensorSpec {
                name: n.to_string(),
                dtype: t.dtype(),
                shape: t.dims().to_vec(),
            })
            .collect();
        let meta = [("k".to_string(), "v".to_string())].into();
        write_safetensors_with(&p, &specs, &meta, false, |i| Ok(tensors[i].clone()))?;
        let back = candle_core::safetensors::load(&p, &Device::Cpu)?;
        assert_eq!(
            back["a"].to_vec2::<f32>()?,
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        assert_eq!(
            back["b"].to_dtype(DType::F32)?.to_vec1::<f32>()?,
            vec![5.0, 6.0, 7.0]
        );
        // A tensor that does not match its spec aborts the write and leaves nothing behind.
        let q = dir.path().join("bad.safetensors");
        let bad = write_safetensors_with(&q, &specs, &meta, false, |_| Ok(tensors[1].clone()));
        assert!(bad.is_err() && !q.exists());
        Ok(())
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let e = check_regular(dir.path(), u64::MAX).unwrap_err().to_string();
        assert!(e.ends_with("is a folder, not a regular file"), "{e}");
        let e = read_regular(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a device, FIFO or socket"), "{e}");
        let p = dir.path().join("a.toml");
        write_atomic(&p, b"0123456789", false)?;
        assert_eq!(check_regular(&p, 10)?, 10);
        let e = check_regular(&p, 9).unwrap_err().to_string();
        assert!(
            e.contains("is 10 bytes; the limit for this kind of file is 9"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn refuses_to_overwrite_without_permission() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"one", false)?;
        assert!(write_atomic(&p, b"two", false).is_err());
        assert_eq!(std::fs::read(&p).map_err(|e| Error::io(&p, e))?, b"one");
        write_atomic(&p, b"two", true)?;
        assert_eq!(std::fs::read(&p).map_err(|e| Error::io(&p, e))?, b"two");
        let leftovers = std::fs::read_dir(dir.path())
            .map_err(|e| Error::io(dir.path(), e))?
            .count();
        assert_eq!(leftovers, 1, "no temporary files are left behind");
        Ok(())
    }
}
