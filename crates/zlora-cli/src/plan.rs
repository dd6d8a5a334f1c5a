//! `zlora plan CONFIG [--gpu 4090,a100,...] [--gpus N [--link pcie|nvlink|network]] [--json]`:
//! memory, time, cost and downloads of a training configuration before any GPU is rented, on
//! one GPU or data-parallel on several (docs/plan.md).

use std::fmt::Write;
use std::path::PathBuf;

use zlora::plan::gpus::{GpuTable, Link};
use zlora::plan::memory::{Phase, GIB};
use zlora::plan::scaling::{DataParallel, Scaling};
use zlora::plan::{plan_on, GpuEstimate, Plan, PlanOptions, MAX_CAPTION_TOKENS};
use zlora::train::config::TrainConfig;

#[derive(clap::Args)]
pub struct Args {
    /// The training configuration (the same TOML `zlora train` reads).
    config: PathBuf,
    /// GPUs to estimate for, comma-separated names from the GPU table (default: all).
    #[arg(long, value_delimiter = ',')]
    gpu: Vec<String>,
    /// A GPU table replacing the built-in one (same format: see docs/plan.md).
    #[arg(long)]
    gpu_table: Option<PathBuf>,
    /// Also plan data-parallel training on up to N GPUs of each kind (1, 2, 4, ..., N).
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// What links the GPUs (default: each GPU's usual link in the GPU table).
    #[arg(long, value_name = "pcie|nvlink|network")]
    link: Option<Link>,
    /// Print JSON instead of the report.
    #[arg(long)]
    json: bool,
    /// Caption tokens per item, chat template included (default: Z-Image's maximum).
    #[arg(long, default_value_t = MAX_CAPTION_TOKENS)]
    caption_tokens: usize,
    /// Download bandwidth in MB/s.
    #[arg(long, default_value_t = 100.0)]
    bandwidth: f64,
    /// Days the model is kept on a rented volume, for the storage cost.
    #[arg(long, default_value_t = 30.0)]
    storage_days: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.bandwidth > 0.0 && a.bandwidth.is_finite(),
        "--bandwidth must be a positive number of MB/s"
    );
    anyhow::ensure!(
        a.storage_days >= 0.0 && a.storage_days.is_finite(),
        "--storage-days must not be negative"
    );
    anyhow::ensure!(
        (1..=MAX_CAPTION_TOKENS).contains(&a.caption_tokens),
        "--caption-tokens must be 1 to {MAX_CAPTION_TOKENS} (the text encoder reads at most \
         {MAX_CAPTION_TOKENS} tokens), got {}",
        a.caption_tokens
    );
    anyhow::ensure!(a.gpus >= 1, "--gpus must be at least 1");
    anyhow::ensure!(
        a.link.is_none() || a.gpus > 1,
        "--link applies to several GPUs: add --gpus N (N > 1)"
    );
    let cfg = TrainConfig::from_file(&a.config)?;
    let table = match &a.gpu_table {
        Some(path) => GpuTable::from_file(path)?,
        None => GpuTable::built_in()?,
    };
    let opts = PlanOptions {
        gpus: a.gpu,
        table,
        caption_tokens: a.caption_tokens,
        bandwidth_mb_s: a.bandwidth,
        storage_days: a.storage_days,
    };
    let parallel = DataParallel {
        gpus: a.gpus,
        link: a.link,
    };
    let plan = plan_on(&cfg, &opts, &parallel)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", report(&plan, &a.config.display().to_string()));
    }
    Ok(())
}

fn report(p: &Plan, config: &str) -> String {
    let mut out = String::new();
    let w = &p.workload;
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "zlora plan for {config} (mode {})", p.mode);
    let _ = writeln!(out, "model: {}", p.model);
    let _ = writeln!(
        out,
        "one micro-batch: {} × ({} image + {} caption tokens), checkpointing {}, accumulation {}",
        w.batch,
        w.image_tokens,
        w.caption_tokens,
        if w.checkpointing { "on" } else { "off" },
        w.accumulation
    );
    memory_section(&mut out, p);
    compute_section(&mut out, p);
    gpu_section(&mut out, p);
    download_section(&mut out, p);
    let _ = writeln!(out, "\nnotes:");
    for note in &p.notes {
        let _ = writeln!(out, "  - {note}");
    }
    out
}

fn phases(out: &mut String, phases: &[Phase], peak: &str) {
    for phase in phases {
        let mark = if phase.name == peak { "  <- peak" } else { "" };
        let _ = writeln!(
            out,
            "  {:<28} {:>9.2}{mark}",
            phase.name,
            phase.total() / GIB
        );
        for item in &phase.items {
            let _ = writeln!(out, "      {:<52} {:>9.2}", item.what, item.bytes / GIB);
        }
    }
}

fn memory_section(out: &mut String, p: &Plan) {
    let _ = writeln!(
        out,
        "\nGPU memory by phase (estimate, GiB; zlora on CUDA, see notes):"
    );
    phases(out, &p.memory, p.peak_phase);
    let _ = writeln!(
        out,
        "  for comparison, a PyTorch-class trainer (flash attention): {:.1} GiB in phase {:?}",
        p.pytorch_reference.peak_memory_gib, p.pytorch_reference.peak_phase
    );
    let _ = writeln!(
        out,
        "\nzlora on this CPU: peak resident memory {:.0} MiB in phase {:?} (measured basis: \
         docs/benchmarks.md)",
        p.cpu.peak_rss_mib, p.cpu.peak_phase
    );
}

fn compute_section(out: &mut String, p: &Plan) {
    let f = &p.flops;
    let _ = writeln!(
        out,
        "\nFLOPs per step (counted): {:.3e} = forward {:.3e} + backward {:.3e} + recompute {:.3e}{}{}",
        f.per_step,
        f.forward,
        f.backward,
        f.recompute,
        if f.preservation > 0.0 {
            format!(" + preservation {:.3e}", f.preservation)
        } else {
            String::new()
        },
        if p.workload.accumulation > 1 {
            format!(", × {} micro-batches", p.workload.accumulation)
        } else {
            String::new()
        }
    );
    if let Some(s) = &p.sampling {
        let _ = writeln!(
            out,
            "samples during training: {} grids × {} forwards = {:.3e} FLOPs",
            s.grids, s.forwards_per_grid, s.flops
        );
    }
}

fn gpu_section(out: &mut String, p: &Plan) {
    let _ = writeln!(
        out,
        "\nper GPU (estimates: throughput = peak × efficiency, prices from the GPU table):"
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>7} {:>8} {:>5} {:>8} {:>8} {:>7} {:>9}",
        "gpu", "memory", "peak", "fits", "s/step", "hours", "$/hour", "cost $"
    );
    for g in &p.gpus {
        let _ = writeln!(
            out,
            "  {:<10} {:>7.0} {:>8.1} {:>5} {:>8.2} {:>8.2} {:>7.2} {:>9.2}",
            g.name,
            g.memory_gib,
            g.peak_memory_gib,
            if g.fits { "yes" } else { "no" },
            g.seconds_per_step,
            g.total_hours,
            g.usd_per_hour,
            g.cost_usd
        );
    }
    fit_section(out, p);
    for g in &p.gpus {
        if let Some(s) = &g.scaling {
            scaling_section(out, g, s);
        }
    }
    for g in p.gpus.iter().filter(|g| !g.fits) {
        let _ = writeln!(
            out,
            "  {} ({:.0} GiB) does not fit; to fit:",
            g.name, g.memory_gib
        );
        for c in &g.changes {
            let verdict = if c.fits { "fits" } else { "still too large" };
            let _ = writeln!(
                out,
                "    - {}: {:.1} GiB, {verdict}",
                c.change, c.peak_memory_gib
            );
        }
    }
}

/// One GPU type on 1, 2, 4, ... GPUs, and where more stop paying off.
fn scaling_section(out: &mut String, g: &GpuEstimate, s: &Scaling) {
    let most = s.counts.last().map_or(1, |c| c.gpus);
    let _ = writeln!(
        out,
        "\ndata-parallel on up to {most} × {} over {} (estimates: all-reduce bus bandwidth \
         {:.0} GB/s, {:.1} µs per ring step; each optimizer step all-reduces {:.1} MB of f32 \
         LoRA gradients after the backward, not overlapped; seconds per step, peak GiB per \
         GPU):",
        g.name,
        s.link,
        s.link_gb_s,
        s.latency_us,
        s.all_reduce_bytes / 1e6
    );
    let _ = writeln!(
        out,
        "  {:>5} {:>9} {:>8} {:>5} {:>8} {:>11} {:>8} {:>8} {:>10} {:>9}",
        "gpus",
        "batch/gpu",
        "peak",
        "fits",
        "s/step",
        "all-reduce",
        "hours",
        "speedup",
        "efficiency",
        "cost $"
    );
    for c in &s.counts {
        let Some(r) = &c.run else {
            let _ = writeln!(out, "  {:>5} does not divide batch_size", c.gpus);
            continue;
        };
        let _ = writeln!(
            out,
            "  {:>5} {:>9} {:>8.1} {:>5} {:>8.2} {:>11.3} {:>8.2} {:>8.2} {:>9.0}% {:>9.2}",
            c.gpus,
            r.per_gpu_batch,
            r.peak_memory_gib,
            if r.fits { "yes" } else { "no" },
            r.seconds_per_step,
            r.all_reduce_seconds,
            r.total_hours,
            r.speedup,
            100.0 * r.efficiency,
            r.cost_usd
        );
    }
    let _ = writeln!(out, "  verdict: {}", s.verdict);
}

/// Per GPU and base storage, the fewest swapped blocks that fit and the step time then.
fn fit_section(out: &mut String, p: &Plan) {
    let _ = writeln!(
        out,
        "\nleast block swap that fits, per base computed in bf16 (blocks swapped of the main \
         layers; s/step with the copies, not overlapped, at the table's host link):"
    );
    let bases: Vec<&str> = p.gpus.first().map_or(Vec::new(), |g| {
        g.fit.iter().map(|f| f.base.as_str()).collect()
    });
    let _ = write!(out, "  {:<10}", "gpu");
    for b in &bases {
        let _ = write!(out, " {:>18}", b);
    }
    let _ = writeln!(out);
    let mut text_quantized = false;
    for g in &p.gpus {
        let _ = write!(out, "  {:<10}", g.name);
        for f in &g.fit {
            // A row that needs the text encoder quantized where the configuration has not.
            let te = if f.quantize_text_encoder != p.workload.quantize_text_encoder {
                text_quantized = true;
                " +te"
            } else {
                ""
            };
            let cell = if f.fits {
                format!("{} swap{te}, {:.2} s", f.swapped_blocks, f.seconds_per_step)
            } else {
                format!("no ({:.1} GiB{te})", f.peak_memory_gib)
            };
            let _ = write!(out, " {cell:>18}");
        }
        let _ = writeln!(out);
    }
    if text_quantized {
        let _ = writeln!(
            out,
            "  +te: with the text encoder's projections stored in 8 bits (quantize_text_encoder \
             = \"int8\"): in bf16 it alone does not fit (for \"no\", the peak with them)"
        );
    }
}

fn download_section(out: &mut String, p: &Plan) {
    let d = &p.downloads;
    let _ = writeln!(out, "\ndownloads (sizes: see basis):");
    for part in &d.parts {
        let _ = writeln!(
            out,
            "  {:<44} {:>8.2} GB  {}{}  [{}]",
            part.what,
            part.bytes as f64 / 1e9,
            part.repo,
            if part.present { " (present)" } else { "" },
            part.basis
        );
    }
    let _ = writeln!(
        out,
        "  to download: {:.2} GB, {:.1} min at {} MB/s",
        p.download_gb,
        d.transfer_hours * 60.0,
        d.bandwidth_mb_s
    );
    let _ = writeln!(
        out,
        "  keeping all {:.2} GB on a volume for {} days: ${:.2} ({})",
        d.total_gb, d.storage_days, d.storage_usd, d.storage_source
    );
}
