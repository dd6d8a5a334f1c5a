//! Data-parallel training on the tiny model, the workers being threads joined by an in-process
//! exchange: two workers with one item each of every global batch of two train what one worker
//! trains on the whole batch (with the epoch's short last batch, gradient accumulation and
//! active clipping), only rank 0 writes, a run stopped on one worker's request resumes with
//! another worker count to the uninterrupted run, and a batch the workers cannot split is
//! refused, and so are workers that resume from different checkpoints.
//!
//! Tolerance: the two runs compute the same sums in another order (two one-item forwards and
//! a mean of their gradients, against one two-item forward and its mean), so they agree to
//! f32 rounding, about 1e-7 relative per operation. AdamW divides each update by the root of
//! its second moment, so a gradient's relative rounding error becomes the same relative
//! error in its update rather than shrinking with it (most where a clipped gradient's
//! element nears AdamW's eps), and six steps add theirs up: LoRA tensors are compared to
//! 1e-4 of each tensor's largest value (measured: 7e-6), losses and gradient norms to 1e-5
//! relative (measured: about 1e-7). A share taken wrongly gives differences of 0.7 to 1.7
//! (docs/training.md, "Data parallel", has the measurements).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use zlora::data::synthetic;
use zlora::model::tiny::{self, TinySpec};
use zlora::train::config::TrainConfig;
use zlora::train::exchange::InProcess;
use zlora::train::trainer::{train, train_with, Event, Outcome, TrainOptions};

const STEPS: u64 = 6;
const MAX_GRAD_NORM: f64 = 0.05;
const TOLERANCE: f64 = 1e-5;
const LORA_TOLERANCE: f64 = 1e-4;

/// A tiny model and five images: with two items a batch, every epoch ends with a batch of
/// one, which leaves worker 1 no item.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec {
            dim: 32,
            ..TinySpec::default()
        };
        tiny::create(&dir.path().join("model"), &spec, false).unwrap();
        synthetic::create(&dir.path().join("data"), 5, 64, false).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The run's config: a global batch of `batch_size`, two micro-batches a step, output
    /// into `out`.
    fn config(&self, out: &str, batch_size: usize) -> TrainConfig {
        TrainConfig::parse(&format!(
            r#"[model]
path = "{model}"
variant = "turbo"
base_dtype = "f32"
[dataset]
path = "{data}"
resolution = 32
[lora]
rank = 2
alpha = 2
[train]
steps = {STEPS}
learning_rate = 1e-3
batch_size = {batch_size}
gradient_accumulation = 2
max_grad_norm = {MAX_GRAD_NORM}
seed = 7
save_every = 2
output = "{out}"
[sample]
every = 3
prompts = ["a disc"]
seeds = [1]
steps = 2
"#,
            model = self.path("model").display(),
            data = self.path("data").display(),
            out = self.path(out).display(),
        ))
        .unwrap()
    }
}

/// How a run is started: from scratch or resumed, and (worker, step): the worker that asks
/// to stop once it has reported that step (the run stops after the next one).
#[derive(Clone, Copy, Default)]
struct Start {
    resume: bool,
    stop_after: Option<(usize, u64)>,
}

fn options(start: Start) -> (TrainOptions, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let opts = TrainOptions {
        resume: start.resume,
        stop: Some(stop.clone()),
        ..TrainOptions::default()
    };
    (opts, stop)
}

/// The events handler of worker `rank`: raises its stop flag as `start` says; counts the
/// checkpoints and sample grids it reports into `written`.
fn handler<'a>(
    start: Start,
    rank: usize,
    stop: &'a AtomicBool,
    written: &'a mut usize,
) -> impl FnMut(Event) + 'a {
    move |event| match event {
        Event::Step(entry) if start.stop_after == Some((rank, entry.step)) => {
            stop.store(true, Ordering::SeqCst)
        }
        Event::Checkpoint(_) | Event::Samples(_) => *written += 1,
        _ => {}
    }
}

/// One worker alone.
fn one_worker(cfg: &TrainConfig, start: Start) -> Outcome {
    let (opts, stop) = options(start);
    let mut written = 0;
    let outcome = train(cfg, &opts, &mut handler(start, 0, &stop, &mut written));
    outcome.unwrap()
}

/// Two workers in threads, each with its config; each one's outcome (or error) and how many
/// checkpoints and sample grids it reported writing.
fn two_workers(configs: [&TrainConfig; 2], start: Start) -> Vec<(zlora::Result<Outcome>, usize)> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = InProcess::group(2)
            .into_iter()
            .zip(configs)
            .enumerate()
            .map(|(rank, (mut exchange, cfg))| {
                scope.spawn(move || {
                    let (opts, stop) = options(start);
                    let mut written = 0;
                    let mut events = handler(start, rank, &stop, &mut written);
                    let outcome = train_with(cfg, &opts, &mut exchange, &mut events);
                    drop(events);
                    (outcome, written)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// A log.jsonl's entries in order.
fn log(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A log's numbers `key`, one per step.
fn series(run: &Path, key: &str) -> Vec<f64> {
    log(run).iter().map(|e| e[key].as_f64().unwrap()).collect()
}

fn assert_close_series(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        let err = (x - y).abs() / y.abs().max(1e-12);
        assert!(err <= TOLERANCE, "{what}: {a:?} vs {b:?}");
    }
}

/// The two LoRA files hold the same tensors, each to LORA_TOLERANCE of its largest value.
fn assert_same_lora(a: &Path, b: &Path) {
    let load = |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (ta, tb) = (load(a), load(b));
    assert_eq!(
        ta.keys().collect::<BTreeSet<_>>(),
        tb.keys().collect::<BTreeSet<_>>()
    );
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let mut worst = 0f64;
    for (name, x) in &ta {
        let y = &tb[name];
        let err = max_abs(&(x - y).unwrap()) as f64 / (max_abs(y) as f64).max(1e-12);
        worst = worst.max(err);
        assert!(
            err <= LORA_TOLERANCE,
            "{name}: relative difference {err:e} between {} and {}",
            a.display(),
            b.display()
        );
    }
    eprintln!(
        "{} vs {}: largest relative difference {worst:e}",
        a.display(),
        b.display()
    );
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

#[test]
fn two_workers_with_one_item_each_train_what_one_worker_trains_on_the_whole_batch() {
    let s = Setup::new();
    one_worker(&s.config("one", 2), Start::default());
    // Worker 1's config names an output of its own: it must not come into existence.
    let (rank0, rank1) = (s.config("two", 2), s.config("rank1-output", 2));
    let outcomes = two_workers([&rank0, &rank1], Start::default());
    for (outcome, _) in &outcomes {
        let outcome = outcome.as_ref().unwrap();
        assert_eq!((outcome.steps, outcome.stopped), (STEPS, false));
    }
    let rank0 = outcomes[0].0.as_ref().unwrap();
    assert_eq!(rank0.lora, s.path("two/lora.safetensors"));

    assert_same_lora(
        &s.path("two/lora.safetensors"),
        &s.path("one/lora.safetensors"),
    );
    let norms = series(&s.path("one"), "grad_norm");
    assert!(
        norms.iter().all(|&n| n > MAX_GRAD_NORM),
        "clipping is active at every step: {norms:?}"
    );
    assert_close_series(
        &series(&s.path("two"), "grad_norm"),
        &norms,
        "gradient norms",
    );
    assert_close_series(
        &series(&s.path("two"), "loss"),
        &series(&s.path("one"), "loss"),
        "losses",
    );
    // Rank 0 wrote what the one worker wrote, each step's log line once; rank 1 nothing.
    assert_eq!(files(&s.path("two")), files(&s.path("one")));
    let steps: Vec<f64> = series(&s.path("two"), "step");
    assert_eq!(steps, (1..=STEPS).map(|s| s as f64).collect::<Vec<_>>());
    assert!(outcomes[0].1 > 0, "rank 0 reported checkpoints and samples");
    assert_eq!(outcomes[1].1, 0, "rank 1 reported writing");
    assert!(!s.path("rank1-output").exists(), "rank 1 wrote an output");
}

/// Stopped by worker 1's request after step 3 (its flag raised after step 2 is seen at step
/// 3's exchange, by both), resumed by one worker; stopped on one worker, resumed by two:
/// both end with the uninterrupted run's LoRA and log.
#[test]
fn a_run_stopped_on_two_workers_resumes_on_one_and_the_reverse_to_the_uninterrupted_run() {
    let s = Setup::new();
    one_worker(&s.config("reference", 2), Start::default());
    let stop = |rank| Start {
        resume: false,
        stop_after: Some((rank, 2)),
    };
    let resume = Start {
        resume: true,
        stop_after: None,
    };

    let cfg = s.config("two-then-one", 2);
    for (outcome, _) in two_workers([&cfg, &cfg], stop(1)) {
        let outcome = outcome.unwrap();
        assert_eq!((outcome.steps, outcome.stopped), (3, true));
        assert!(outcome
            .lora
            .ends_with("checkpoints/step-000003/lora.safetensors"));
    }
    assert_eq!(one_worker(&cfg, resume).steps, STEPS);

    let cfg = s.config("one-then-two", 2);
    let stopped = one_worker(&cfg, stop(0));
    assert_eq!((stopped.steps, stopped.stopped), (3, true));
    for (outcome, _) in two_workers([&cfg, &cfg], resume) {
        assert_eq!(outcome.unwrap().steps, STEPS);
    }

    let reference = s.path("reference");
    for run in ["two-then-one", "one-then-two"] {
        let run = s.path(run);
        assert_same_lora(
            &run.join("lora.safetensors"),
            &reference.join("lora.safetensors"),
        );
        assert_close_series(&series(&run, "loss"), &series(&reference, "loss"), "losses");
        assert_eq!(series(&run, "step"), series(&reference, "step"));
    }
}

#[test]
fn a_global_batch_the_workers_cannot_split_evenly_is_refused_by_each() {
    let s = Setup::new();
    let cfg = s.config("odd", 3);
    for (outcome, written) in two_workers([&cfg, &cfg], Start::default()) {
        let e = outcome.err().expect("refused").to_string();
        assert!(
            e.contains("batch_size = 3") && e.contains("multiple of 2"),
            "{e}"
        );
        assert_eq!(written, 0);
    }
    assert!(!s.path("odd").exists());
}

/// Workers that find different checkpoints (here: each given another output folder, as
/// machines without a shared filesystem would) refuse to train from different points.
#[test]
fn workers_that_resume_from_different_steps_refuse_to_go_on() {
    let s = Setup::new();
    let (at_3, at_2) = (s.config("at-3", 2), s.config("at-2", 2));
    let stop_after = |step| Start {
        resume: false,
        stop_after: Some((0, step)),
    };
    assert_eq!(one_worker(&at_3, stop_after(2)).steps, 3);
    assert_eq!(one_worker(&at_2, stop_after(1)).steps, 2);
    let resume = Start {
        resume: true,
        stop_after: None,
    };
    let outcomes = two_workers([&at_3, &at_2], resume);
    let errors: Vec<String> = outcomes
        .into_iter()
        .map(|(o, _)| o.err().expect("refused").to_string())
        .collect();
    assert!(
        errors[1].contains("worker 1 resumed at step 2 but the others from another checkpoint"),
        "{errors:?}"
    );
    // Worker 0 sees the difference too (the mean 2.5 is not its 3), or worker 1 leaving.
    assert!(
        errors[0].contains("worker 0 resumed at step 3") || errors[0].contains("has stopped"),
        "{errors:?}"
    );
}
