//! Which device runs the models, and the compute dtype that suits it.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// `ZLORA_DEVICE=cpu|cuda|metal` picks a device; otherwise the first GPU the build supports,
/// falling back to the CPU.
pub fn select() -> Result<Device> {
    match std::env::var("ZLORA_DEVICE").ok().as_deref() {
        None | Some("") => Ok(first_gpu().unwrap_or(Device::Cpu)),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => {
            Device::new_cuda(0).map_err(|e| Error::Invalid(format!("ZLORA_DEVICE=cuda: {e}")))
        }
        Some("metal") => {
            Device::new_metal(0).map_err(|e| Error::Invalid(format!("ZLORA_DEVICE=metal: {e}")))
        }
        Some(other) => Err(Error::Invalid(format!(
            "ZLORA_DEVICE={other}: expected cpu, cuda or metal"
        ))),
    }
}

fn first_gpu() -> Option<Device> {
    if cfg!(feature = "cuda") {
        if let Ok(d) = Device::new_cuda(0) {
            return Some(d);
        }
    }
    if cfg!(feature = "metal") {
        if let Ok(d) = Device::new_metal(0) {
            return Some(d);
        }
    }
    None
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
