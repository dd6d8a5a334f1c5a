//! Which kernels run on the CPU: zlora's fused f32 kernels ([`super::cpu`], the banded VAE
//! convolution), or the generic candle ops that a GPU runs (`ZLORA_KERNELS=generic`).
//!
//! The generic setting exists so that the exact code path of a CUDA or Metal run (candle's
//! composed and fused ops, in the same order, in the same dtypes) can be exercised and held to
//! the reference fixtures on a machine without a GPU. It is process-wide, like the thread
//! count: the CLI sets it from the environment at start-up, tests that need it set it first.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

use crate::{Error, Result};

static GENERIC: AtomicBool = AtomicBool::new(false);

/// The environment variable that chooses the kernels.
pub const ENV: &str = "ZLORA_KERNELS";

/// The two kernel sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// zlora's fused CPU kernels where they apply (the default).
    Native,
    /// Only the ops a GPU runs, on every device.
    Generic,
}

impl Kernels {
    /// `native` (or unset/empty) or `generic`; anything else is an error naming the variable.
    pub fn parse(value: Option<&str>) -> Result<Self> {
        match value {
            None | Some("") | Some("native") => Ok(Kernels::Native),
            Some("generic") => Ok(Kernels::Generic),
            Some(other) => Err(Error::Invalid(format!(
                "{ENV}={other}: expected native or generic"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Native => "native",
            Kernels::Generic => "generic",
        }
    }
}

/// Sets the kernels for the whole process.
pub fn set(kernels: Kernels) {
    GENERIC.store(kernels == Kernels::Generic, Ordering::Relaxed);
}

/// Reads [`ENV`] and sets the kernels from it.
pub fn set_from_env() -> Result<Kernels> {
    let kernels = Kernels::parse(std::env::var(ENV).ok().as_deref())?;
    set(kernels);
    Ok(kernels)
}

/// The kernels in force.
pub fn current() -> Kernels {
    if GENERIC.load(Ordering::Relaxed) {
        Kernels::Generic
    } else {
        Kernels::Native
    }
}

/// Whether zlora's own CPU kernels may run on `device`: it is the CPU and the generic
/// kernels were not asked for.
pub fn native_cpu(device: &Device) -> bool {
    device.is_cpu() && current() == Kernels::Native
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_names_and_refuses_others() {
        assert_eq!(Kernels::parse(None).unwrap(), Kernels::Native);
        assert_eq!(Kernels::parse(Some("")).unwrap(), Kernels::Native);
        assert_eq!(Kernels::parse(Some("generic")).unwrap(), Kernels::Generic);
        let e = Kernels::parse(Some("fast")).unwrap_err().to_string();
        assert!(e.contains("ZLORA_KERNELS=fast"), "{e}");
    }
}
