//! Writes that never leave a half-written file and never replace a user's file by surprise.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder, fsync and rename,
/// so a crash leaves either the old file or the new one. An existing file is an error unless
/// `overwrite` is set.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    if !overwrite && path.exists() {
        return Err(Error::bad_file(
            path,
            "already exists (pass --force to overwrite it)",
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
