//! Which device runs the models, and the compute dtype that suits it.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// The environment variable that chooses the device.
pub const ENV: &str = "ZLORA_DEVICE";

/// `ZLORA_DEVICE=cpu|cuda|metal` picks a device, `cuda:N` / `metal:N` GPU N of several (the
/// launchers of multi-GPU runs and sweeps set it per process); unset, a GPU build takes its
/// GPU 0 and a CPU build the CPU. Never a silent fallback: a GPU that was asked for (or that a
/// GPU build expects) and cannot start is an error that says why and how to run on the CPU
/// instead.
pub fn select() -> Result<Device> {
    let wanted = std::env::var(ENV).ok();
    let why = format!("{ENV}={}", wanted.as_deref().unwrap_or_default());
    match wanted.as_deref().map(parse) {
        None | Some(Ok(None)) => match built_gpu() {
            Some(kind) => start(kind, 0, "this build's default"),
            None => Ok(Device::Cpu),
        },
        Some(Ok(Some(Choice::Cpu))) => Ok(Device::Cpu),
        Some(Ok(Some(Choice::Gpu(kind, ordinal)))) => start(kind, ordinal, &why),
        Some(Err(e)) => Err(e),
    }
}

/// What a `ZLORA_DEVICE` value asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Cpu,
    Gpu(Gpu, usize),
}

/// A `ZLORA_DEVICE` value: empty (the build's default), `cpu`, `cuda`, `metal`, `cuda:N`,
/// `metal:N`.
fn parse(value: &str) -> Result<Option<Choice>> {
    let bad = || {
        Error::Invalid(format!(
            "{ENV}={value}: expected cpu, cuda, metal, cuda:N or metal:N (N: the GPU's number, 0 first)"
        ))
    };
    let (name, ordinal) = match value.split_once(':') {
        Some((name, n)) => (name, n.parse::<usize>().map_err(|_| bad())?),
        None => (value, 0),
    };
    Ok(match name {
        "" if ordinal == 0 => None,
        "cpu" if !value.contains(':') => Some(Choice::Cpu),
        "cuda" => Some(Choice::Gpu(Gpu::Cuda, ordinal)),
        "metal" => Some(Choice::Gpu(Gpu::Metal, ordinal)),
        _ => return Err(bad()),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gpu {
    Cuda,
    Metal,
}

impl Gpu {
    fn name(self) -> &'static str {
        match self {
            Gpu::Cuda => "CUDA",
            Gpu::Metal => "Metal",
        }
    }

    fn compiled(self) -> bool {
        match self {
            Gpu::Cuda => cfg!(feature = "cuda"),
            Gpu::Metal => cfg!(feature = "metal"),
        }
    }

    fn feature(self) -> &'static str {
        match self {
            Gpu::Cuda => "cuda",
            Gpu::Metal => "metal",
        }
    }
}

/// The GPU backend this binary was built with, if any.
fn built_gpu() -> Option<Gpu> {
    [Gpu::Cuda, Gpu::Metal].into_iter().find(|g| g.compiled())
}

/// Starts GPU `ordinal` of `kind`; `why` says who asked for it.
fn start(kind: Gpu, ordinal: usize, why: &str) -> Result<Device> {
    if !kind.compiled() {
        return Err(Error::Invalid(format!(
            "{why}, but this zlora was built without {} support: use a build with \
             `--features {}` (docs/gpu.md) or set {ENV}=cpu",
            kind.name(),
            kind.feature()
        )));
    }
    let started = match kind {
        Gpu::Cuda => Device::new_cuda(ordinal),
        Gpu::Metal => Device::new_metal(ordinal),
    };
    started.map_err(|e| {
        Error::Invalid(format!(
            "{why}: {} GPU {ordinal} did not start ({e}); check the driver with `zlora doctor`, \
             or set {ENV}=cpu to run on the CPU",
            kind.name()
        ))
    })
}

/// One line naming the device and compute dtype a command runs with, e.g.
/// `device: CUDA GPU 0, bf16`; every command that loads a model reports it.
pub fn describe(device: &Device, dtype: DType) -> String {
    let place = match device {
        Device::Cpu => "CPU".to_string(),
        Device::Cuda(_) => format!("CUDA GPU {}", gpu_number(device)),
        Device::Metal(_) => format!("Metal GPU {}", gpu_number(device)),
    };
    let kernels = match crate::nn::kernels::current() {
        crate::nn::kernels::Kernels::Generic if device.is_cpu() => " (generic kernels)",
        _ => "",
    };
    format!("device: {place}{kernels}, {}", dtype.as_str())
}

fn gpu_number(device: &Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id }
        | candle_core::DeviceLocation::Metal { gpu_id } => gpu_id,
        candle_core::DeviceLocation::Cpu => 0,
    }
}

/// bf16 on a GPU (memory and tensor cores), f32 on the CPU (where bf16 saves memory only and
/// candle widens it to f32 for every matmul).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Memory in use on a CUDA device (MiB, all processes, as the driver reports it: what the
/// allocator holds, not only live tensors); `None` elsewhere or when the driver says nothing.
pub fn gpu_memory_in_use_mib(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as f64 / (1024.0 * 1024.0));
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_values_name_a_backend_and_a_gpu_number() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("cpu").unwrap(), Some(Choice::Cpu));
        assert_eq!(parse("cuda").unwrap(), Some(Choice::Gpu(Gpu::Cuda, 0)));
        assert_eq!(parse("cuda:3").unwrap(), Some(Choice::Gpu(Gpu::Cuda, 3)));
        assert_eq!(parse("metal:1").unwrap(), Some(Choice::Gpu(Gpu::Metal, 1)));
        for bad in ["gpu", "cuda:", "cuda:x", "cpu:1", "cuda:-1", ":2"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("ZLORA_DEVICE={bad}")) && e.contains("cuda:N"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_gpu_number_on_a_build_without_that_backend_is_refused_by_name() {
        if cfg!(feature = "cuda") {
            return;
        }
        let e = start(Gpu::Cuda, 2, "ZLORA_DEVICE=cuda:2")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ZLORA_DEVICE=cuda:2") && e.contains("--features cuda"),
            "{e}"
        );
    }
}
