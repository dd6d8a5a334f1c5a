//! The CPU memory model against measured training runs (`measured_memory.csv`, written by
//! scripts/measure_memory.py: the peak RSS of `zlora train` on random-weight models of many
//! shapes, and where recorded the peak of its second step alone). The "fit" rows set the
//! fitted constants of [`Profile::cpu`]; the "held-out" rows were not used for the fit, and
//! the model must predict them within [`HELD_OUT_BOUND`].

use candle_core::DType;

use super::dims::ModelDims;
use super::memory::{estimate, Phase, Profile, Run, MIB};
use super::workload;
use crate::model::tiny::{TextSize, TinySpec, VaeSize};
use crate::train::config::TrainConfig;

const MEASURED: &str = include_str!("measured_memory.csv");

/// Relative error allowed on every held-out run.
const HELD_OUT_BOUND: f64 = 0.10;
/// Relative error allowed on every fitted run.
const FIT_BOUND: f64 = 0.10;

/// One measured run: a CSV row by column name.
struct Measured<'a> {
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Measured<'a> {
    fn get(&self, column: &str) -> &'a str {
        self.fields
            .iter()
            .find(|(c, _)| *c == column)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("measured_memory.csv has no column {column}"))
    }

    fn number(&self, column: &str) -> usize {
        self.get(column).parse().unwrap()
    }

    fn spec(&self) -> TinySpec {
        let shape = match self.get("model") {
            // Saved in the run's dtype, as the released files are bf16.
            "real-width" => TinySpec {
                dtype: match self.get("base_dtype") {
                    "bf16" => DType::BF16,
                    _ => DType::F32,
                },
                ..TinySpec::real_width(self.number("layers"))
            },
            _ => TinySpec {
                dim: self.number("dim"),
                layers: self.number("layers"),
                heads: self.number("heads"),
                refiners: self.number("refiners"),
                text: TextSize::Tiny,
                vae: match self.get("vae") {
                    "real" => VaeSize::ZImage,
                    _ => VaeSize::Tiny,
                },
                ..TinySpec::default()
            },
        };
        assert_eq!(shape.dim, self.number("dim"), "{}", self.name());
        shape
    }

    /// The training configuration the script wrote for this run.
    fn config(&self) -> TrainConfig {
        let targets = match self.get("targets") {
            "default" => "",
            "attention" => {
                "modules = [\"attention.to_q\", \"attention.to_k\", \"attention.to_v\", \
                 \"attention.to_out.0\"]"
            }
            "all" => {
                "stacks = [\"layers\", \"noise_refiner\", \"context_refiner\"]\nmodules = \
                 [\"attention.to_q\", \"attention.to_k\", \"attention.to_v\", \
                 \"attention.to_out.0\", \"feed_forward.w1\", \"feed_forward.w2\", \
                 \"feed_forward.w3\", \"adaLN_modulation.0\"]"
            }
            other => panic!("unknown targets {other}"),
        };
        let swap = match self.get("blocks_on_device") {
            "" => String::new(),
            n => format!("blocks_on_device = {n}\n"),
        };
        TrainConfig::parse(&format!(
            "[model]\npath = \"model\"\nvariant = \"turbo\"\nbase_dtype = \"{}\"\n{swap}\
             [dataset]\npath = \"data\"\nresolution = {}\n\
             [lora]\nrank = {rank}\nalpha = {rank}\n{targets}\n\
             [train]\nsteps = 2\nlearning_rate = 1e-4\nbatch_size = {}\nsave_every = 1000000\n\
             output = \"run\"\ngradient_checkpointing = {}\n",
            self.get("base_dtype"),
            self.get("resolution"),
            self.get("batch"),
            self.get("checkpointing"),
            rank = self.get("rank"),
        ))
        .unwrap()
    }

    fn name(&self) -> String {
        self.fields
            .iter()
            .filter(|(c, _)| !c.ends_with("_mib"))
            .map(|(_, v)| *v)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// What `zlora plan` predicts for this run on the CPU: the largest phase of a run whose
    /// latents and captions are cached (the encoders never load), and the training phase.
    fn predicted_mib(&self) -> (f64, f64) {
        let dims = ModelDims::of_tiny(&self.spec()).unwrap();
        let cfg = self.config();
        let lora = dims.lora(&cfg.lora);
        let run = Run {
            dims: &dims,
            lora: &lora,
            adapter: &[],
        };
        let work = workload(&cfg, &dims, self.number("caption_tokens")).unwrap();
        let phases = estimate(&run, &work, &Profile::cpu(self.number("threads")));
        let run_peak = phases
            .iter()
            .filter(|p| !p.name.contains("(cache)"))
            .map(Phase::total)
            .fold(0.0, f64::max);
        let training = phases
            .iter()
            .find(|p| p.name == "training")
            .map_or(0.0, Phase::total);
        (run_peak / MIB, training / MIB)
    }
}

fn measured_runs() -> Vec<Measured<'static>> {
    let mut lines = MEASURED
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|l| Measured {
            fields: header.iter().copied().zip(l.split(',')).collect(),
        })
        .collect()
}

/// Every run of `role` is within `bound` of its measured peak; prints the comparison.
fn check(role: &str, bound: f64) {
    let runs: Vec<_> = measured_runs()
        .into_iter()
        .filter(|r| r.get("role") == role)
        .collect();
    assert!(runs.len() >= 6, "{role}: only {} runs", runs.len());
    let mut worst = Vec::new();
    for run in &runs {
        let (whole, training) = run.predicted_mib();
        // The whole run's peak, and where recorded its second step's alone.
        let pairs = [
            ("run", whole, "measured_mib"),
            ("step", training, "training_mib"),
        ];
        for (what, predicted, column) in pairs {
            let Ok(measured) = run.get(column).parse::<f64>() else {
                continue;
            };
            let error = predicted / measured - 1.0;
            println!(
                "{} {what}: predicted {predicted:.1} MiB, measured {measured:.1} MiB, {:+.1} %",
                run.name(),
                100.0 * error
            );
            if error.abs() > bound {
                worst.push(format!("{} {what} ({:+.1} %)", run.name(), 100.0 * error));
            }
        }
    }
    assert!(
        worst.is_empty(),
        "{role} runs off by more than {} %: {worst:?}",
        100.0 * bound
    );
}

#[test]
fn the_cpu_memory_model_predicts_the_held_out_runs() {
    check("held-out", HELD_OUT_BOUND);
}

#[test]
fn the_cpu_memory_model_fits_the_runs_it_was_fitted_on() {
    check("fit", FIT_BOUND);
}
