//! The gradient exchange across GPUs and nodes: NCCL, one communicator per process.
//!
//! NCCL is opened at run time (`dlopen` of `libnccl.so.2`), not linked: candle links its CUDA
//! libraries, so cudarc's NCCL module would make `libnccl` a load-time dependency of every
//! command of a CUDA build, and a machine without it could not even print `--help`. Here a
//! missing library is an error of the multi-GPU run alone, with how to install it. Only the six
//! entry points of NCCL's stable C API that the exchange needs are bound.
//!
//! Each step's gradients travel as one f32 buffer (all tensors flattened and concatenated):
//! one all-reduce per step whatever the number of LoRA tensors, and sums in f32 whatever the
//! compute dtype.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use candle_core::cuda::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Shape, Tensor};

use super::rendezvous::{World, ID_BYTES};
use super::GradientExchange;
use crate::{Error, Result};

/// The library names tried, the versioned one first (what NVIDIA's packages install).
const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// `ncclFloat32` and `ncclSum` in NCCL's C API (nccl.h; unchanged since 2.0).
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; ID_BYTES],
}

type Comm = *mut c_void;

/// The entry points, resolved once per process.
struct Library {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// Kept open for the process's lifetime: the function pointers above point into it.
    _library: libloading::Library,
}

/// NCCL, opened on first use; the same error every time when it is missing.
fn library() -> Result<&'static Library> {
    static LIBRARY: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(open)
        .as_ref()
        .map_err(|why| Error::Invalid(why.clone()))
}

fn open() -> std::result::Result<Library, String> {
    // SAFETY: loading NCCL runs only its initialisers, which have no preconditions.
    let library = LIBRARY_NAMES
        .iter()
        .find_map(|name| unsafe { libloading::Library::new(*name) }.ok())
        .ok_or_else(|| {
            "NCCL (libnccl.so.2) is not installed, and training on several GPUs needs it: \
             `pip install nvidia-nccl-cu13` (CUDA 13; nvidia-nccl-cu12 for CUDA 12) and add its \
             nvidia/nccl/lib folder to LD_LIBRARY_PATH, or install NVIDIA's libnccl2 package \
             (docs/multi-gpu.md)"
                .to_string()
        })?;
    // SAFETY: each symbol is given its type from nccl.h.
    unsafe {
        Ok(Library {
            get_version: symbol(&library, "ncclGetVersion")?,
            get_unique_id: symbol(&library, "ncclGetUniqueId")?,
            comm_init_rank: symbol(&library, "ncclCommInitRank")?,
            all_reduce: symbol(&library, "ncclAllReduce")?,
            comm_abort: symbol(&library, "ncclCommAbort")?,
            get_error_string: symbol(&library, "ncclGetErrorString")?,
            _library: library,
        })
    }
}

/// # Safety
/// `T` must be the symbol's C type.
unsafe fn symbol<T: Copy>(
    library: &libloading::Library,
    name: &str,
) -> std::result::Result<T, String> {
    library
        .get::<T>(name.as_bytes())
        .map(|f| *f)
        .map_err(|e| format!("the NCCL library found has no {name} ({e}): install NCCL 2.x"))
}

impl Library {
    /// A failed NCCL call as an error naming what was asked and NCCL's reason.
    fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let reason = unsafe { CStr::from_ptr((self.get_error_string)(code)) };
        Err(Error::Invalid(format!(
            "NCCL {what} failed: {} (NCCL error {code}); run again with NCCL_DEBUG=WARN (or INFO) \
             to see why (docs/multi-gpu.md)",
            reason.to_string_lossy()
        )))
    }
}

/// The NCCL version this process would use, e.g. `2.27.3` (`zlora doctor` reports it).
pub fn version() -> Result<String> {
    let nccl = library()?;
    let mut code: c_int = 0;
    // SAFETY: ncclGetVersion writes one int.
    nccl.check("version query", unsafe { (nccl.get_version)(&mut code) })?;
    // NCCL_VERSION(X, Y, Z) is X * 10000 + Y * 100 + Z since 2.9 (X * 1000 + Y * 100 + Z before).
    let (major, rest) = if code >= 10000 {
        (code / 10000, code % 10000)
    } else {
        (code / 1000, code % 1000)
    };
    Ok(format!("{major}.{}.{}", rest / 100, rest % 100))
}

/// A new communicator id; rank 0 makes it and the rendezvous hands it to the others.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    let nccl = library()?;
    let mut id = UniqueId {
        internal: [0; ID_BYTES],
    };
    // SAFETY: ncclGetUniqueId fills the 128 bytes.
    nccl.check("id creation", unsafe { (nccl.get_unique_id)(&mut id) })?;
    Ok(id.internal)
}

/// This process's member of an NCCL communicator over all ranks' GPUs.
pub struct Nccl {
    nccl: &'static Library,
    comm: Comm,
    rank: usize,
    world_size: usize,
    device: Device,
}

// SAFETY: an NCCL communicator may be used from any thread as long as its calls do not
// overlap; every call here goes through `&mut self` (or `&self` inside one such call).
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator that `id` (from [`unique_id`] on rank 0) names, on `device`, this
    /// process's GPU. Returns once every rank has joined.
    pub fn join(device: &Device, world: &World, id: &[u8; ID_BYTES]) -> Result<Nccl> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Invalid(format!(
                "training on several GPUs runs on CUDA GPUs, and this rank's device is {device:?}: \
                 leave ZLORA_DEVICE unset or set it to cuda:N"
            )));
        };
        let nccl = library()?;
        // NCCL opens the communicator on the calling thread's current CUDA device.
        cuda.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Invalid(format!("cannot make {device:?} current ({e})")))?;
        let (rank, world_size) = (world.rank, world.world_size);
        let mut comm: Comm = std::ptr::null_mut();
        let id = UniqueId { internal: *id };
        // SAFETY: `comm` receives the new communicator; the sizes fit an int (checked below).
        let code =
            unsafe { (nccl.comm_init_rank)(&mut comm, c_count(world_size)?, id, c_count(rank)?) };
        nccl.check(
            &format!("communicator start (rank {rank} of {world_size})"),
            code,
        )?;
        Ok(Nccl {
            nccl,
            comm,
            rank,
            world_size,
            device: device.clone(),
        })
    }

    /// The element-wise sum over all ranks of a 1-D f32 tensor on this rank's GPU.
    fn sum_over_ranks(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.apply_op1_no_bwd(&SumOverRanks(self))?)
    }
}

fn c_count(n: usize) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| Error::Invalid(format!("{n} ranks are more than NCCL takes")))
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Abort rather than destroy: it never waits for a peer that is gone. Every result was
        // read before the exchange is dropped, so nothing in flight is lost.
        // SAFETY: `comm` came from ncclCommInitRank and is not used again.
        unsafe { (self.nccl.comm_abort)(self.comm) };
    }
}

impl GradientExchange for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        if tensors.is_empty() {
            return Ok(Vec::new());
        }
        let flat = tensors
            .iter()
            .map(|t| t.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mean = (self.sum_over_ranks(&Tensor::cat(&flat, 0)?)? / self.world_size as f64)?;
        let mut offset = 0;
        tensors
            .iter()
            .map(|t| {
                let part = mean.narrow(0, offset, t.elem_count())?;
                offset += t.elem_count();
                Ok(part.reshape(t.shape())?.to_dtype(t.dtype())?)
            })
            .collect()
    }

    /// A one-element all-reduce, read back: no rank gets past it before all have reached it.
    fn barrier(&mut self) -> Result<()> {
        let one = Tensor::ones(1, DType::F32, &self.device)?;
        let arrived = self.sum_over_ranks(&one)?.to_vec1::<f32>()?[0];
        if arrived != self.world_size as f32 {
            return Err(Error::Invalid(format!(
                "NCCL barrier counted {arrived} of {} ranks",
                self.world_size
            )));
        }
        Ok(())
    }
}

/// candle's hook for running NCCL on a tensor's CUDA buffer, on candle's own stream (so the
/// all-reduce is ordered after the kernels that computed the gradients, and before those that
/// read the result).
struct SumOverRanks<'a>(&'a Nccl);

impl candle_core::CustomOp1 for SumOverRanks<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL exchange takes tensors on its CUDA GPU, not on the CPU")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL exchange takes contiguous tensors")
        };
        let device = storage.device.clone();
        let stream = device.cuda_stream();
        let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: the all-reduce writes every element before anything reads them.
        let mut dst = unsafe { device.alloc::<f32>(end - start)? };
        {
            let (src_ptr, _read) = src.device_ptr(&stream);
            let (dst_ptr, _write) = dst.device_ptr_mut(&stream);
            let nccl = self.0.nccl;
            // SAFETY: both buffers hold `end - start` f32 on this communicator's GPU, and the
            // call is queued on the stream that produced `src` and will consume `dst`.
            let code = unsafe {
                (nccl.all_reduce)(
                    src_ptr as *const c_void,
                    dst_ptr as *mut c_void,
                    end - start,
                    NCCL_FLOAT32,
                    NCCL_SUM,
                    self.0.comm,
                    stream.cu_stream() as *mut c_void,
                )
            };
            nccl.check("all-reduce", code)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(dst, device),
            layout.shape().clone(),
        ))
    }
}
