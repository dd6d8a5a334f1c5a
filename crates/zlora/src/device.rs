//! Which device runs the models, and the compute dtype that suits it.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// The environment variable that chooses the device.
pub const ENV: &str = "ZLORA_DEVICE";

/// `ZLORA_DEVICE=cpu|cuda|metal` picks a device; unset, a GPU build takes its GPU and a CPU
/// build the CPU. Never a silent fallback: a GPU that was asked for (or that a GPU build
/// expects) and cannot start is an error that says why and how to run on the CPU instead.
pub fn select() -> Result<Device> {
    let wanted = std::env::var(ENV).ok();
    match wanted.as_deref() {
        None | Some("") => match built_gpu() {
            Some(kind) => start(kind, "this build's default"),
            None => Ok(Device::Cpu),
        },
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => start(Gpu::Cuda, "ZLORA_DEVICE=cuda"),
        Some("metal") => start(Gpu::Metal, "ZLORA_DEVICE=metal"),
        Some(other) => Err(Error::Invalid(format!(
            "{ENV}={other}: expected cpu, cuda or metal"
        ))),
    }
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

/// Starts GPU 0 of `kind`; `why` says who asked for it.
fn start(kind: Gpu, why: &str) -> Result<Device> {
    if !kind.compiled() {
        return Err(Error::Invalid(format!(
            "{why}, but this zlora was built without {} support: use a build with \
             `--features {}` (docs/gpu.md) or set {ENV}=cpu",
            kind.name(),
            kind.feature()
        )));
    }
    let started = match kind {
        Gpu::Cuda => Device::new_cuda(0),
        Gpu::Metal => Device::new_metal(0),
    };
    started.map_err(|e| {
        Error::Invalid(format!(
            "{why}: the {} GPU did not start ({e}); check the driver with `zlora doctor`, \
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
        Device::Cuda(_) => "CUDA GPU 0".to_string(),
        Device::Metal(_) => "Metal GPU 0".to_string(),
    };
    let kernels = match crate::nn::kernels::current() {
        crate::nn::kernels::Kernels::Generic if device.is_cpu() => " (generic kernels)",
        _ => "",
    };
    format!("device: {place}{kernels}, {}", dtype.as_str())
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
