//! `zlora plan --gpus N`: data-parallel training on several GPUs. Each GPU runs one process
//! holding the whole frozen base; `[train] batch_size` is the global batch, split evenly over
//! the GPUs, each accumulating its share over `gradient_accumulation` micro-batches as one
//! GPU does. After the last micro-batch's backward one ring all-reduce sums every trainable
//! parameter's f32 gradient — not overlapped with compute, since zlora exchanges after the
//! backward — and every GPU takes the same optimizer step. Per GPU, a step then costs the
//! compute of its share, block swap's copies in full (they do not shrink with the batch) and
//! the all-reduce; the samples taken during training are not split.

use serde::Serialize;

use super::gpus::{Gpu, Link, LinkRate};
use super::memory::{self, GIB};
use super::{flops, peak_of, workload, Context, RunTime};
use crate::Result;

/// Efficiency (speedup / GPUs) below which more GPUs stop paying off: the run then costs more
/// than 1 / 0.7 = 1.43 times what it costs on one GPU (cost = GPUs × price × time, so the
/// cost ratio is 1 / efficiency).
pub const PAYS_OFF: f64 = 0.70;

/// How many GPUs a plan considers, and what links them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DataParallel {
    /// The most GPUs to plan for.
    pub gpus: usize,
    /// None: each GPU's usual link from the GPU table.
    pub link: Option<Link>,
}

impl DataParallel {
    pub const ONE: Self = Self {
        gpus: 1,
        link: None,
    };
}

/// One GPU type on 1, 2, 4, ... GPUs.
#[derive(Debug, Clone, Serialize)]
pub struct Scaling {
    pub link: Link,
    /// The link's all-reduce bus bandwidth, GB/s (estimate, from the GPU table).
    pub link_gb_s: f64,
    pub latency_us: f64,
    /// Bytes every optimizer step all-reduces: each trainable parameter's f32 gradient.
    pub all_reduce_bytes: f64,
    pub counts: Vec<GpuCount>,
    /// The most GPUs, of those listed, before the efficiency first falls under 70 %.
    pub pays_off_up_to: usize,
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuCount {
    pub gpus: usize,
    /// None when `gpus` does not divide `[train] batch_size`.
    pub run: Option<ParallelRun>,
}

/// The run on some number of GPUs; times are each GPU's, which run in step.
#[derive(Debug, Clone, Serialize)]
pub struct ParallelRun {
    pub per_gpu_batch: usize,
    /// One GPU's peak with its share of the batch.
    pub peak_memory_gib: f64,
    pub fits: bool,
    pub compute_seconds_per_step: f64,
    pub swap_seconds_per_step: f64,
    pub all_reduce_seconds: f64,
    pub seconds_per_step: f64,
    /// The samples taken during training, which more GPUs do not speed up.
    pub sampling_hours: f64,
    pub total_hours: f64,
    /// One GPU's hours over these GPUs' hours.
    pub speedup: f64,
    /// speedup / GPUs.
    pub efficiency: f64,
    /// GPUs × hourly price × hours.
    pub cost_usd: f64,
}

/// Ring all-reduce of `bytes` over `gpus` GPUs: 2(N−1) steps (a reduce-scatter, then an
/// all-gather) that each move 1/N of the bytes over every link at once and wait one hop's
/// latency.
pub fn ring_all_reduce_seconds(bytes: f64, gpus: usize, link: &LinkRate) -> f64 {
    if gpus <= 1 {
        return 0.0;
    }
    let (n, steps) = (gpus as f64, 2.0 * (gpus - 1) as f64);
    steps / n * bytes / link.bytes_per_s + steps * link.latency_s
}

/// The GPU counts a plan lists: 1, 2, 4, ... below `most`, then `most`.
pub fn gpu_counts(most: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < most)
        .collect();
    counts.push(most.max(1));
    counts
}

impl Context<'_> {
    /// `gpu` on 1 up to `parallel.gpus` GPUs (None for one GPU).
    pub(super) fn scaling(&self, gpu: &Gpu, parallel: &DataParallel) -> Result<Option<Scaling>> {
        if parallel.gpus <= 1 {
            return Ok(None);
        }
        let link = self.opts.table.link(gpu, parallel.link)?;
        let params: u64 = self.run.lora.iter().map(|m| m.params).sum();
        let bytes = 4.0 * params as f64;
        let batch = self.cfg.train.batch_size;
        let steps = self.cfg.train.steps;
        let one = self.on(gpu, 1, bytes, &link)?.0.hours(steps);
        let counts = gpu_counts(parallel.gpus)
            .into_iter()
            .map(|n| {
                if !batch.is_multiple_of(n) {
                    return Ok(GpuCount { gpus: n, run: None });
                }
                let (time, peak) = self.on(gpu, n, bytes, &link)?;
                let hours = time.hours(steps);
                let speedup = one / hours;
                let run = ParallelRun {
                    per_gpu_batch: batch / n,
                    peak_memory_gib: peak / GIB,
                    fits: peak <= gpu.memory_gib * GIB,
                    compute_seconds_per_step: time.compute,
                    swap_seconds_per_step: time.swap,
                    all_reduce_seconds: time.all_reduce,
                    seconds_per_step: time.per_step(),
                    sampling_hours: time.sampling / 3600.0,
                    total_hours: hours,
                    speedup,
                    efficiency: speedup / n as f64,
                    cost_usd: n as f64 * gpu.usd_per_hour * hours,
                };
                Ok(GpuCount {
                    gpus: n,
                    run: Some(run),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (pays_off_up_to, mut verdict) = verdict(&counts, batch, steps);
        if let Some(note) = memory_note(&counts) {
            verdict = format!("{verdict}; {note}");
        }
        Ok(Some(Scaling {
            link: link.link,
            link_gb_s: link.bytes_per_s / 1e9,
            latency_us: link.latency_s * 1e6,
            all_reduce_bytes: bytes,
            counts,
            pays_off_up_to,
            verdict,
        }))
    }

    /// Each of `gpus` GPUs' time and peak memory with its share of the batch.
    fn on(&self, gpu: &Gpu, gpus: usize, bytes: f64, link: &LinkRate) -> Result<(RunTime, f64)> {
        let mut work = workload(self.cfg, self.run.dims, self.opts.caption_tokens)?;
        work.batch /= gpus;
        let mut time = self.time(gpu, &work, flops::step(self.run, &work).per_step);
        time.all_reduce = ring_all_reduce_seconds(bytes, gpus, link);
        let peak = peak_of(&memory::estimate(self.run, &work, self.profile)).1;
        Ok((time, peak))
    }
}

/// "1 GPU", "4 GPUs".
fn gpus(n: usize) -> String {
    if n == 1 {
        "1 GPU".into()
    } else {
        format!("{n} GPUs")
    }
}

/// The most GPUs that still pay off, and why not more: the first listed count under 70 %
/// efficiency (with what keeps it there), a per-GPU batch already 1, or a batch_size the
/// larger counts do not divide.
fn verdict(counts: &[GpuCount], batch: usize, steps: u64) -> (usize, String) {
    let mut best: Option<&ParallelRun> = None;
    let mut best_gpus = 1;
    for c in counts {
        let Some(run) = &c.run else { continue };
        if run.efficiency < PAYS_OFF {
            let text = format!(
                "more GPUs stop paying off after {}: on {} the efficiency is {:.0} % (under \
                 {:.0} %; the run costs {:.2}× what it costs on one GPU), {}",
                gpus(best_gpus),
                c.gpus,
                100.0 * run.efficiency,
                100.0 * PAYS_OFF,
                1.0 / run.efficiency,
                bound_by(run, c.gpus, steps)
            );
            return (best_gpus, text);
        }
        best = Some(run);
        best_gpus = c.gpus;
    }
    let efficiency = best.map_or(1.0, |r| 100.0 * r.efficiency);
    let most = counts.last().map_or(1, |c| c.gpus);
    let text = if best_gpus == most {
        format!(
            "still pays off on {}: efficiency {efficiency:.0} %",
            gpus(most)
        )
    } else if batch / best_gpus == 1 {
        format!(
            "pays off up to {} (efficiency {efficiency:.0} %), where the per-GPU batch is \
             already 1: more GPUs need a larger batch_size",
            gpus(best_gpus)
        )
    } else {
        let beyond: Vec<String> = counts
            .iter()
            .filter(|c| c.gpus > best_gpus)
            .map(|c| c.gpus.to_string())
            .collect();
        format!(
            "pays off up to {} (efficiency {efficiency:.0} %); batch_size = {batch} does not \
             split evenly over {} GPUs: more GPUs need a batch_size they divide",
            gpus(best_gpus),
            beyond.join(", ")
        )
    };
    (best_gpus, text)
}

/// The counts whose per-GPU share of the batch does not fit one GPU's memory, if any.
fn memory_note(counts: &[GpuCount]) -> Option<String> {
    let tight: Vec<String> = counts
        .iter()
        .filter(|c| c.run.as_ref().is_some_and(|r| !r.fits))
        .map(|c| c.gpus.to_string())
        .collect();
    (!tight.is_empty()).then(|| {
        format!(
            "memory: each GPU's share of the batch does not fit at {} GPU(s)",
            tight.join(", ")
        )
    })
}

/// What keeps `gpus` GPUs from `gpus` times the speed: the largest of the all-reduce, block
/// swap's copies (every GPU makes them all) and the samples (not split), by the time each
/// costs beyond a perfect split, with its share of the run.
fn bound_by(run: &ParallelRun, gpus: usize, steps: u64) -> String {
    let unsplit = 1.0 - 1.0 / gpus as f64;
    let steps = steps as f64;
    let parts = [
        ("the all-reduce", steps * run.all_reduce_seconds, 1.0),
        (
            "block swap's copies",
            steps * run.swap_seconds_per_step,
            unsplit,
        ),
        ("the samples", run.sampling_hours * 3600.0, unsplit),
    ];
    let (name, seconds, _) = parts
        .iter()
        .max_by(|a, b| (a.1 * a.2).total_cmp(&(b.1 * b.2)))
        .copied()
        .unwrap_or(parts[0]);
    format!(
        "{name} taking {:.0} % of its run time",
        100.0 * seconds / (run.total_hours * 3600.0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::gpus::GpuTable;
    use crate::plan::{plan, plan_on, GpuEstimate, PlanOptions, MAX_CAPTION_TOKENS};
    use crate::train::config::TrainConfig;

    fn link(gb_s: f64, latency_us: f64) -> LinkRate {
        LinkRate {
            link: Link::Network,
            bytes_per_s: gb_s * 1e9,
            latency_s: latency_us * 1e-6,
        }
    }

    /// 1.2 GB over 12 GB/s with 10 µs per step: 2 GPUs send half of it twice (0.1 s) in 2
    /// steps; 4 GPUs send 3/4 of it twice (0.15 s) in 6 steps.
    #[test]
    fn the_ring_all_reduce_by_hand() {
        let l = link(12.0, 10.0);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert_eq!(ring_all_reduce_seconds(1.2e9, 1, &l), 0.0);
        assert!(close(ring_all_reduce_seconds(1.2e9, 2, &l), 0.1 + 2e-5));
        assert!(close(ring_all_reduce_seconds(1.2e9, 4, &l), 0.15 + 6e-5));
        // The bandwidth term approaches twice the bytes; the latency term grows with N.
        assert!(close(ring_all_reduce_seconds(1.2e9, 8, &l), 0.175 + 14e-5));
        assert!(close(ring_all_reduce_seconds(0.0, 8, &l), 14e-5));
    }

    #[test]
    fn the_listed_gpu_counts_are_powers_of_two_then_the_most() {
        assert_eq!(gpu_counts(1), [1]);
        assert_eq!(gpu_counts(2), [1, 2]);
        assert_eq!(gpu_counts(3), [1, 2, 3]);
        assert_eq!(gpu_counts(6), [1, 2, 4, 6]);
        assert_eq!(gpu_counts(8), [1, 2, 4, 8]);
    }

    fn turbo_adapter(edit: impl Fn(&mut TrainConfig)) -> TrainConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/turbo-adapter.toml");
        let mut cfg = TrainConfig::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut cfg);
        cfg
    }

    fn options(gpu: &str) -> PlanOptions {
        PlanOptions {
            gpus: vec![gpu.to_string()],
            table: GpuTable::built_in().unwrap(),
            caption_tokens: MAX_CAPTION_TOKENS,
            bandwidth_mb_s: 100.0,
            storage_days: 0.0,
        }
    }

    fn on(cfg: &TrainConfig, gpu: &str, gpus: usize, link: Option<Link>) -> GpuEstimate {
        let parallel = DataParallel { gpus, link };
        let mut p = plan_on(cfg, &options(gpu), &parallel).unwrap();
        p.gpus.remove(0)
    }

    fn run(s: &Scaling, gpus: usize) -> &ParallelRun {
        let count = s.counts.iter().find(|c| c.gpus == gpus).unwrap();
        count.run.as_ref().unwrap()
    }

    /// Batch 8 on 1..8 4090s: one GPU's row is the single-GPU plan; each row's step is its
    /// share's compute (the plan of batch_size = its share) plus the ring all-reduce of the
    /// LoRA's f32 gradients over the 4090's PCIe link; its peak is that share's; cost is GPUs
    /// × price × hours and the efficiency its reciprocal against one GPU's cost.
    #[test]
    fn each_gpu_count_computes_its_share_and_exchanges_the_lora_gradients() {
        let cfg = turbo_adapter(|c| c.train.batch_size = 8);
        let g = on(&cfg, "4090", 8, None);
        let s = g.scaling.as_ref().unwrap();
        assert_eq!(s.link, Link::Pcie);
        assert!((s.link_gb_s - 8.0).abs() < 1e-12 && (s.latency_us - 5.7).abs() < 1e-12);
        // Rank 16 on the 30 main layers: 4 attention (3840 → 3840) and 3 feed-forward
        // (3840 ↔ 10240) Linears, rank · (in + out) each.
        let params = 30.0 * (4.0 * 16.0 * 7680.0 + 3.0 * 16.0 * 14080.0);
        assert_eq!(s.all_reduce_bytes, 4.0 * params);
        let one = run(s, 1);
        assert_eq!(one.total_hours, g.total_hours);
        assert_eq!(one.seconds_per_step, g.seconds_per_step);
        assert_eq!((one.peak_memory_gib, one.fits), (g.peak_memory_gib, g.fits));
        assert_eq!(
            (one.speedup, one.efficiency, one.all_reduce_seconds),
            (1.0, 1.0, 0.0)
        );
        for n in [2, 4, 8] {
            let r = run(s, n);
            let share = plan(
                &turbo_adapter(|c| c.train.batch_size = 8 / n),
                &options("4090"),
            )
            .unwrap()
            .gpus
            .remove(0);
            assert_eq!(r.per_gpu_batch, 8 / n);
            assert_eq!(r.peak_memory_gib, share.peak_memory_gib);
            let ring = 2.0 * (n - 1) as f64 * (s.all_reduce_bytes / n as f64 / 8e9 + 5.7e-6);
            assert!((r.all_reduce_seconds - ring).abs() < 1e-12, "{n}: {r:?}");
            let step = share.seconds_per_step + ring;
            assert!((r.seconds_per_step - step).abs() < 1e-9, "{n}: {r:?}");
            assert!((r.efficiency - one.total_hours / r.total_hours / n as f64).abs() < 1e-12);
            let cost = n as f64 * 0.60 * r.total_hours;
            assert!((r.cost_usd - cost).abs() < 1e-9);
            assert!((r.cost_usd / g.cost_usd - 1.0 / r.efficiency).abs() < 1e-9);
        }
        // A smaller share of the batch needs less memory per GPU.
        assert!(run(s, 8).peak_memory_gib < one.peak_memory_gib);
    }

    /// Counts that do not divide batch_size are listed without a run; with the per-GPU batch
    /// at 1 the verdict says more GPUs need a larger batch.
    #[test]
    fn counts_that_do_not_divide_the_batch_are_listed_as_such() {
        let six = on(&turbo_adapter(|c| c.train.batch_size = 6), "h100", 8, None);
        let s = six.scaling.unwrap();
        let divides: Vec<(usize, bool)> =
            s.counts.iter().map(|c| (c.gpus, c.run.is_some())).collect();
        assert_eq!(divides, [(1, true), (2, true), (4, false), (8, false)]);
        assert_eq!(s.pays_off_up_to, 2, "{}", s.verdict);
        assert!(
            s.verdict.contains("does not split evenly over 4, 8 GPUs"),
            "{}",
            s.verdict
        );

        let two = on(&turbo_adapter(|c| c.train.batch_size = 2), "h100", 4, None);
        let s = two.scaling.unwrap();
        assert_eq!(s.pays_off_up_to, 2, "{}", s.verdict);
        assert!(
            s.verdict.contains("per-GPU batch is already 1"),
            "{}",
            s.verdict
        );
    }

    /// A rank-256 LoRA at 512 px over a 100 Gb/s network: each step exchanges
    /// gigabytes against a fraction of a second of compute on an H100, so more GPUs stop
    /// paying off at once, bound by the all-reduce; over NVLink the same run still pays off.
    #[test]
    fn a_big_lora_over_a_slow_link_stops_paying_off_at_few_gpus() {
        let cfg = turbo_adapter(|c| {
            c.train.batch_size = 8;
            c.lora.rank = 256;
            c.lora.alpha = 256.0;
            for d in &mut c.datasets {
                d.resolution = crate::data::dataset::Resolution::One(512);
            }
            c.sample.every = 0;
        });
        let network = on(&cfg, "h100", 8, Some(Link::Network)).scaling.unwrap();
        eprintln!("{network:#?}");
        assert!(
            network.all_reduce_bytes > 1e9,
            "{}",
            network.all_reduce_bytes
        );
        assert!(network.pays_off_up_to <= 2, "{}", network.verdict);
        assert!(
            network.verdict.contains("stop paying off"),
            "{}",
            network.verdict
        );
        assert!(
            network.verdict.contains("the all-reduce taking"),
            "{}",
            network.verdict
        );
        let nvlink = on(&cfg, "h100", 8, None).scaling.unwrap();
        eprintln!("{}", nvlink.verdict);
        assert_eq!(nvlink.link, Link::Nvlink);
        assert!(
            nvlink.pays_off_up_to > network.pays_off_up_to,
            "{}",
            nvlink.verdict
        );
    }

    /// The same run on H100s over NVLink exchanges faster than on 4090s over PCIe, and loses
    /// less of its speedup to it, although each H100 computes its share faster; over the same
    /// network both exchange in the same time.
    #[test]
    fn nvlink_h100s_scale_better_than_pcie_4090s() {
        let cfg = turbo_adapter(|c| c.train.batch_size = 8);
        let h100 = on(&cfg, "h100", 8, None).scaling.unwrap();
        let rtx = on(&cfg, "4090", 8, None).scaling.unwrap();
        for n in [2, 4, 8] {
            let (h, r) = (run(&h100, n), run(&rtx, n));
            assert!(h.all_reduce_seconds * 10.0 < r.all_reduce_seconds, "{n}");
            assert!(
                h.compute_seconds_per_step < r.compute_seconds_per_step,
                "{n}"
            );
            let share = |x: &ParallelRun| x.all_reduce_seconds / x.seconds_per_step;
            assert!(share(h) < share(r), "{n}");
        }
        let over = |gpu: &str| on(&cfg, gpu, 8, Some(Link::Network)).scaling.unwrap();
        assert_eq!(
            run(&over("h100"), 8).all_reduce_seconds,
            run(&over("4090"), 8).all_reduce_seconds
        );
    }

    #[test]
    fn nvlink_is_refused_for_a_gpu_without_it() {
        let cfg = turbo_adapter(|_| ());
        let parallel = DataParallel {
            gpus: 2,
            link: Some(Link::Nvlink),
        };
        let err = plan_on(&cfg, &options("4090"), &parallel)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"4090\" has no NVLink"), "{err}");
        assert!(err.contains("h100"), "{err}");
        // One GPU has no scaling section.
        assert!(plan(&cfg, &options("4090")).unwrap().gpus[0]
            .scaling
            .is_none());
    }
}
