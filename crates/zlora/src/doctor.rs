//! `zlora doctor`: the first command on a rented machine. It checks how this binary was built,
//! the device it would run on (driver, architecture, libraries, kernels, free memory) and,
//! given a training configuration, whether `zlora plan`'s peak memory fits what is free. Each
//! check is ok or a problem with its fix (docs/gpu.md).
//!
//! What it cannot report: a CUDA build links libcuda, cuBLAS, cuRAND and the CUDA runtime when
//! it starts, so a missing library stops the loader before `main` (`ldd zlora` shows which).

use candle_core::{DType, Device, Tensor};

use crate::plan::gpus::{Gpu, GpuTable};
use crate::plan::memory::{GIB, MIB};
use crate::plan::{plan, PlanOptions, MAX_CAPTION_TOKENS};
use crate::train::config::TrainConfig;
use crate::Result;

/// The architectures release builds are made for (scripts/cuda-build.sh).
pub const RELEASE_ARCHITECTURES: [u32; 5] = [80, 86, 89, 90, 120];

/// How this binary was built.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    pub version: &'static str,
    pub cuda: bool,
    pub metal: bool,
    /// The CUDA release of the nvcc that compiled the kernels ("13.0").
    pub cuda_release: Option<&'static str>,
    /// The compute capability the kernels were compiled for (90 for sm_90a).
    pub compute_cap: Option<u32>,
}

impl Build {
    /// This binary, from the features and what build.rs recorded.
    pub fn this() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            cuda: cfg!(feature = "cuda"),
            metal: cfg!(feature = "metal"),
            cuda_release: option_env!("ZLORA_CUDA_RELEASE"),
            compute_cap: option_env!("ZLORA_CUDA_COMPUTE_CAP").and_then(|c| c.parse().ok()),
        }
    }

    pub fn describe(&self) -> String {
        let mut backends = vec!["CPU".to_string()];
        if self.cuda {
            let release = self.cuda_release.unwrap_or("(nvcc release not recorded)");
            let arch = self
                .compute_cap
                .map_or("an unrecorded architecture".to_string(), sm_name);
            backends.push(format!("CUDA {release}, kernels for {arch}"));
        }
        if self.metal {
            backends.push("Metal".to_string());
        }
        format!("zlora {}; backends: {}", self.version, backends.join(", "))
    }
}

/// candle's name for the kernels of compute capability `cap`: 90 and 120 are compiled
/// arch-specific (cudaforge adds the `a`).
pub fn sm_name(cap: u32) -> String {
    if cap >= 90 {
        format!("sm_{cap}a")
    } else {
        format!("sm_{cap}")
    }
}

/// Whether kernels built for `built` load on a GPU of compute capability `gpu`. Kernels for
/// 80, 86 and 89 are generic PTX, which the driver JIT-compiles for that capability and every
/// later one; sm_90a and sm_120a PTX loads on exactly that capability.
pub fn kernels_run_on(built: u32, gpu: u32) -> bool {
    if built >= 90 {
        gpu == built
    } else {
        gpu >= built
    }
}

/// The release architecture to use on a GPU of compute capability `gpu`: its own, else the
/// newest generic one it can JIT-compile; `None` below 8.0 (bf16 needs Ampere or later).
pub fn release_architecture_for(gpu: u32) -> Option<u32> {
    if RELEASE_ARCHITECTURES.contains(&gpu) {
        return Some(gpu);
    }
    RELEASE_ARCHITECTURES
        .into_iter()
        .filter(|&a| a < 90 && kernels_run_on(a, gpu))
        .max()
}

/// One line of the report: ok, or a problem and its fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub what: &'static str,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: &'static str, detail: impl Into<String>) -> Self {
        Self {
            what,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub checks: Vec<Check>,
    /// The device a run would use, when one was found.
    pub device: Option<Found>,
}

impl Report {
    pub fn problems(&self) -> usize {
        self.checks.iter().filter(|c| c.fix.is_some()).count()
    }

    pub fn ready(&self) -> bool {
        self.problems() == 0 && self.device.is_some()
    }

    /// The one-line verdict.
    pub fn verdict(&self) -> String {
        match (&self.device, self.problems()) {
            (Some(d), 0) if d.gpu => format!("ready: {}", d.label),
            (Some(d), 0) => format!("ready for CPU work ({})", d.label),
            (_, n) => format!(
                "not ready: {n} problem{}, each with its fix above",
                if n == 1 { "" } else { "s" }
            ),
        }
    }
}

/// The device found.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub label: String,
    pub gpu: bool,
    /// Free memory in bytes (GPU memory, or available RAM on the CPU), when known.
    pub free_bytes: Option<f64>,
}

pub struct Options<'a> {
    /// `ZLORA_DEVICE` as set.
    pub requested: Option<String>,
    pub config: Option<&'a TrainConfig>,
    /// GiB to check the configuration against instead of what the device reports free.
    pub memory_gib: Option<f64>,
}

/// Which backend a run would use.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Cpu,
    Cuda,
    Metal,
}

/// Runs every check.
pub fn diagnose(opts: &Options) -> Result<Report> {
    let build = Build::this();
    let mut checks = vec![Check::ok("build", build.describe())];
    let device = match target(&build, opts.requested.as_deref()) {
        Ok(Target::Cpu) => Some(cpu(&build, &mut checks)),
        Ok(Target::Cuda) => cuda(&build, &mut checks),
        Ok(Target::Metal) => metal(&mut checks),
        Err(problem) => {
            checks.push(problem);
            None
        }
    };
    #[cfg(feature = "nccl")]
    checks.push(nccl());
    if let (Some(cfg), Some(found)) = (opts.config, &device) {
        checks.push(fit(cfg, found, opts.memory_gib)?);
    }
    Ok(Report { checks, device })
}

/// Whether NCCL can be opened, for training on several GPUs. Not a problem when it cannot:
/// one GPU does not need it.
#[cfg(feature = "nccl")]
fn nccl() -> Check {
    match crate::train::exchange::nccl::version() {
        Ok(version) => Check::ok(
            "nccl",
            format!("NCCL {version}: training on several GPUs (docs/multi-gpu.md)"),
        ),
        Err(e) => Check::ok("nccl", format!("one GPU only: {e}")),
    }
}

/// The backend `ZLORA_DEVICE` asks for, or the build's GPU backend when it is unset.
fn target(build: &Build, requested: Option<&str>) -> std::result::Result<Target, Check> {
    let missing = |name: &str, backend: &str| {
        let where_from = if name == "cuda" {
            format!(
                "the release binary zlora-{}-linux-x86_64-cuda<X.Y>-sm<ARCH> for this GPU, or \
                 scripts/cuda-build.sh, which needs no system CUDA (docs/gpu.md)",
                build.version
            )
        } else {
            "`cargo build --release --features metal` on the Mac".to_string()
        };
        Check::problem(
            "device",
            format!("ZLORA_DEVICE={name}, but this binary has no {backend} backend"),
            format!(
                "use a {backend} build (`--features {name}`): {where_from}; or unset ZLORA_DEVICE \
                 to run on the CPU"
            ),
        )
    };
    match requested {
        None | Some("") if build.cuda => Ok(Target::Cuda),
        None | Some("") if build.metal => Ok(Target::Metal),
        None | Some("") | Some("cpu") => Ok(Target::Cpu),
        Some("cuda") if build.cuda => Ok(Target::Cuda),
        Some("cuda") => Err(missing("cuda", "CUDA")),
        Some("metal") if build.metal => Ok(Target::Metal),
        Some("metal") => Err(missing("metal", "Metal")),
        Some(other) => Err(Check::problem(
            "device",
            format!("ZLORA_DEVICE={other} is not a device"),
            "set ZLORA_DEVICE to cpu, cuda or metal, or unset it",
        )),
    }
}

fn cpu(build: &Build, checks: &mut Vec<Check>) -> Found {
    let (detail, label) = if build.cuda || build.metal {
        (
            "the CPU, as ZLORA_DEVICE=cpu asks",
            "the CPU, ZLORA_DEVICE=cpu",
        )
    } else {
        (
            "the CPU: this build has no GPU backend (fine for tiny models, LoRA files and plans; \
             train the real model with a CUDA build)",
            "CPU build, no GPU backend",
        )
    };
    checks.push(Check::ok("device", detail));
    checks.push(Check::ok(
        "libraries",
        "none beyond the C runtime on the CPU",
    ));
    let free_bytes = available_ram();
    checks.push(Check::ok(
        "memory",
        free_bytes.map_or(
            "available RAM unknown (no /proc/meminfo)".to_string(),
            |b| format!("{:.1} GiB of RAM available", b / GIB),
        ),
    ));
    Found {
        label: label.to_string(),
        gpu: false,
        free_bytes,
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn available_ram() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

fn metal(checks: &mut Vec<Check>) -> Option<Found> {
    match Device::new_metal(0) {
        Ok(_) => {
            checks.push(Check::ok("device", "Metal GPU 0"));
            Some(Found {
                label: "Metal GPU 0".into(),
                gpu: true,
                free_bytes: None,
            })
        }
        Err(e) => {
            checks.push(Check::problem(
                "device",
                format!("Metal GPU 0 did not open: {e}"),
                "run on Apple silicon, or ZLORA_DEVICE=cpu",
            ));
            None
        }
    }
}

/// What the driver says about CUDA device 0 (only a CUDA build makes one).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CudaInfo {
    name: String,
    /// Compute capability as major·10 + minor.
    cap: u32,
    free: usize,
    total: usize,
}

fn cuda(build: &Build, checks: &mut Vec<Check>) -> Option<Found> {
    let driver = match cuda_driver_version() {
        Ok(v) => v,
        Err(e) => {
            checks.push(Check::problem(
                "driver",
                format!("the NVIDIA driver did not answer: {e}"),
                "install the NVIDIA driver (`nvidia-smi` must work); never put the build's libcuda \
                 stub on LD_LIBRARY_PATH",
            ));
            return None;
        }
    };
    checks.push(driver_check(build.cuda_release, driver));
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            checks.push(Check::problem(
                "device",
                format!("CUDA device 0 did not open (context, cuBLAS, cuRAND): {e}"),
                "check `nvidia-smi` and CUDA_VISIBLE_DEVICES; ZLORA_DEVICE=cpu runs on the CPU",
            ));
            return None;
        }
    };
    checks.push(Check::ok(
        "libraries",
        "CUDA driver, runtime, cuBLAS and cuRAND loaded (handles created)",
    ));
    let info = match cuda_info(&device) {
        Ok(info) => info,
        Err(e) => {
            checks.push(Check::problem(
                "device",
                format!("the driver did not describe CUDA device 0: {e}"),
                "check `nvidia-smi`",
            ));
            return None;
        }
    };
    checks.push(Check::ok(
        "device",
        format!(
            "{}, compute capability {}.{}",
            info.name,
            info.cap / 10,
            info.cap % 10
        ),
    ));
    checks.push(arch_check(build, info.cap));
    checks.push(kernel_check(&device, build));
    checks.push(Check::ok(
        "memory",
        format!(
            "{:.1} GiB free of {:.1} GiB",
            info.free as f64 / GIB,
            info.total as f64 / GIB
        ),
    ));
    Some(Found {
        label: format!(
            "{} ({}, {:.1} GiB free)",
            info.name,
            sm_name(info.cap),
            info.free as f64 / GIB
        ),
        gpu: true,
        free_bytes: Some(info.free as f64),
    })
}

/// "13.0" → 13000, the form cuDriverGetVersion answers in.
fn cuda_version_number(release: &str) -> Option<i32> {
    let (major, minor) = release.split_once('.')?;
    Some(major.parse::<i32>().ok()? * 1000 + minor.parse::<i32>().ok()? * 10)
}

fn version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The driver must support the CUDA release the kernels were compiled with: the driver
/// JIT-compiles their PTX, and refuses a PTX ISA newer than its own.
pub fn driver_check(release: Option<&str>, driver: i32) -> Check {
    let supports = format!("supports CUDA {}", version_text(driver));
    match release.and_then(cuda_version_number) {
        Some(needed) if driver < needed => Check::problem(
            "driver",
            format!(
                "the driver {supports}; this binary was built with CUDA {} and needs a driver for \
                 CUDA {} or later",
                version_text(needed),
                version_text(needed)
            ),
            "update the NVIDIA driver (CUDA 13.x needs driver 580 or later), or use a build made \
             with a CUDA toolkit the driver supports (docs/gpu.md, \"Drivers older than 580\")",
        ),
        Some(_) => Check::ok("driver", format!("the driver {supports}")),
        None => Check::ok(
            "driver",
            format!("the driver {supports} (the build's CUDA release was not recorded)"),
        ),
    }
}

pub fn arch_check(build: &Build, gpu: u32) -> Check {
    let Some(built) = build.compute_cap else {
        return Check::ok("architecture", "the build's architecture was not recorded");
    };
    if kernels_run_on(built, gpu) {
        let how = if built == gpu {
            "native"
        } else {
            "generic PTX, JIT-compiled once by the driver"
        };
        return Check::ok(
            "architecture",
            format!("kernels for {} run on this GPU ({how})", sm_name(built)),
        );
    }
    let fix = match release_architecture_for(gpu) {
        Some(arch) => format!(
            "use the zlora-{}-linux-x86_64-cuda{}-sm{arch} build, or make one with \
             `scripts/cuda-build.sh {arch}`",
            build.version,
            build.cuda_release.unwrap_or("<X.Y>")
        ),
        None => "zlora's CUDA builds need compute capability 8.0 or later (bf16); use a newer \
                 GPU or ZLORA_DEVICE=cpu"
            .to_string(),
    };
    Check::problem(
        "architecture",
        format!(
            "the kernels are for {}, which does not load on compute capability {}.{}",
            sm_name(built),
            gpu / 10,
            gpu % 10
        ),
        fix,
    )
}

/// A bf16 matmul (cuBLAS), a cast and a sum (candle's PTX kernels): the driver must load the
/// kernels and compute 8 × 8 × 8 = 512.
fn kernel_check(device: &Device, build: &Build) -> Check {
    let run = || -> candle_core::Result<f32> {
        let ones = Tensor::ones((8, 8), DType::BF16, device)?;
        ones.matmul(&ones)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()
    };
    let fix = format!(
        "the driver cannot run this build's kernels ({}, CUDA {}): update the driver or use the \
         build for this GPU (docs/gpu.md)",
        build.compute_cap.map_or("?".to_string(), sm_name),
        build.cuda_release.unwrap_or("?")
    );
    match run() {
        Ok(512.0) => Check::ok("kernels", "cuBLAS bf16 matmul and candle's kernels ran"),
        Ok(sum) => Check::problem("kernels", format!("a test matmul gave {sum}, not 512"), fix),
        Err(e) => Check::problem("kernels", format!("a test matmul failed: {e}"), fix),
    }
}

#[cfg(feature = "cuda")]
fn cuda_driver_version() -> std::result::Result<i32, String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut version = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer and needs no cuInit.
    let status = unsafe { sys::cuDriverGetVersion(&mut version) };
    if status == sys::CUresult::CUDA_SUCCESS {
        Ok(version)
    } else {
        Err(format!("{status:?}"))
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_driver_version() -> std::result::Result<i32, String> {
    Err("this binary has no CUDA backend".into())
}

#[cfg(feature = "cuda")]
fn cuda_info(device: &Device) -> std::result::Result<CudaInfo, String> {
    let Device::Cuda(cuda) = device else {
        return Err("not a CUDA device".into());
    };
    let context = cuda.cuda_stream().context().clone();
    let (major, minor) = context.compute_capability().map_err(|e| e.to_string())?;
    let (free, total) = context.mem_get_info().map_err(|e| e.to_string())?;
    Ok(CudaInfo {
        name: context.name().map_err(|e| e.to_string())?,
        cap: (major * 10 + minor) as u32,
        free,
        total,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_info(_: &Device) -> std::result::Result<CudaInfo, String> {
    Err("this binary has no CUDA backend".into())
}

/// Whether `zlora plan`'s peak for `cfg` fits the found device's free memory (or `memory_gib`).
fn fit(cfg: &TrainConfig, found: &Found, memory_gib: Option<f64>) -> Result<Check> {
    let Some(free) = memory_gib.map(|g| g * GIB).or(found.free_bytes) else {
        return Ok(Check::problem(
            "config",
            "the device's free memory is unknown",
            "pass --memory-gib with the memory the run may use",
        ));
    };
    let mut table = GpuTable::built_in()?;
    // The plan's per-GPU advice, for one GPU with this device's free memory; its throughput
    // figures are not reported.
    table.gpus = vec![Gpu {
        name: "this".into(),
        label: found.label.clone(),
        memory_gib: free / GIB,
        peak_tflops: 1.0,
        tflops_source: String::new(),
        usd_per_hour: 0.0,
        price_source: None,
        efficiency: None,
        host_link_gb_s: None,
        link: Default::default(),
        link_gb_s: None,
    }];
    let opts = PlanOptions {
        gpus: Vec::new(),
        table,
        caption_tokens: MAX_CAPTION_TOKENS,
        bandwidth_mb_s: 100.0,
        storage_days: 0.0,
    };
    let p = plan(cfg, &opts)?;
    let (peak, phase, fits, fix) = if found.gpu {
        let g = &p.gpus[0];
        let changes: Vec<&str> = g
            .changes
            .iter()
            .filter(|c| c.fits)
            .map(|c| c.change.as_str())
            .collect();
        let fix = if changes.is_empty() {
            "no single setting makes it fit: use a GPU with more memory (`zlora plan` compares)"
                .to_string()
        } else {
            format!("in the config, set {}", changes.join("; or "))
        };
        (g.peak_memory_gib * GIB, p.peak_phase, g.fits, fix)
    } else {
        let peak = p.cpu.peak_rss_mib * MIB;
        let fix = "use a machine with more memory, or lower what the peak phase holds \
                   (`zlora plan CONFIG` lists it: [model] base_dtype, [dataset] resolution, \
                   [lora] rank, [train] batch_size)"
            .to_string();
        (peak, p.cpu.peak_phase, peak <= free, fix)
    };
    let detail = format!(
        "peak {:.2} GiB in phase {phase:?} (zlora plan, {}) {} {:.2} GiB {}",
        peak / GIB,
        if found.gpu { "on CUDA" } else { "on the CPU" },
        if fits { "fits in" } else { "does not fit in" },
        free / GIB,
        if memory_gib.is_some() {
            "(--memory-gib)"
        } else {
            "free"
        }
    );
    Ok(if fits {
        Check::ok("config", detail)
    } else {
        Check::problem("config", detail, fix)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_ptx_runs_on_later_gpus_and_arch_specific_only_on_its_own() {
        assert!(kernels_run_on(80, 80));
        assert!(kernels_run_on(80, 89));
        assert!(kernels_run_on(80, 120));
        assert!(!kernels_run_on(86, 80));
        assert!(kernels_run_on(90, 90));
        assert!(!kernels_run_on(90, 89));
        assert!(!kernels_run_on(90, 100));
        assert!(!kernels_run_on(120, 121));
    }

    #[test]
    fn each_gpu_gets_its_own_build_else_the_newest_generic_one() {
        assert_eq!(release_architecture_for(89), Some(89));
        assert_eq!(release_architecture_for(120), Some(120));
        assert_eq!(release_architecture_for(87), Some(86));
        assert_eq!(release_architecture_for(100), Some(89));
        assert_eq!(release_architecture_for(75), None);
    }

    #[test]
    fn a_driver_older_than_the_build_is_a_problem() {
        let old = driver_check(Some("13.0"), 12080);
        assert!(old.detail.contains("supports CUDA 12.8"), "{}", old.detail);
        assert!(old.fix.unwrap().contains("580"));
        assert_eq!(driver_check(Some("12.8"), 12080).fix, None);
        assert_eq!(driver_check(Some("13.0"), 13010).fix, None);
        assert_eq!(driver_check(None, 12040).fix, None);
    }

    #[test]
    fn a_build_for_another_architecture_names_the_one_to_use() {
        let build = Build {
            version: "0.1.0",
            cuda: true,
            metal: false,
            cuda_release: Some("13.0"),
            compute_cap: Some(90),
        };
        let check = arch_check(&build, 89);
        assert!(check.detail.contains("sm_90a"), "{}", check.detail);
        let fix = check.fix.unwrap();
        assert!(
            fix.contains("zlora-0.1.0-linux-x86_64-cuda13.0-sm89"),
            "{fix}"
        );
        assert_eq!(arch_check(&build, 90).fix, None);
        let generic = Build {
            compute_cap: Some(80),
            ..build
        };
        let check = arch_check(&generic, 89);
        assert!(
            check.fix.is_none() && check.detail.contains("JIT"),
            "{check:?}"
        );
    }
}
