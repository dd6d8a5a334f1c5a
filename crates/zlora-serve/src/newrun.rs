//! The New run page: a form for each way of training (and De-Turbo, and the experiment of the
//! three ways) that writes the train config or experiment plan as TOML (shown, editable),
//! `zlora plan`'s verdict for one GPU, and a button that queues the TOML as POST /api/jobs
//! does. Plain form posts; the page's script also posts the form to `POST /api/plan` as it
//! changes and puts the verdict (and the TOML) in place.

use std::collections::HashMap;
use std::path::Path;

use maud::{html, Markup};
use serde_json::json;
use toml::{Table, Value};
use zlora::nn::quant::Quantization;
use zlora::plan::gpus::GpuTable;
use zlora::plan::{plan, GpuEstimate, PlanOptions, MAX_CAPTION_TOKENS};
use zlora::train::config::{Mode, TrainConfig};
use zlora::validate::experiment::{self, ExperimentPlan};

use crate::api::{self, internal, Answer};
use crate::http::{Reply, Request};
use crate::jobs::{check_config, Jobs, Kind};
use crate::pages::layout;

/// The ways, each from its example config (examples/*.toml): the value the form sends, its
/// label, the example, and the model folder it suggests under DIR.
const WAYS: [(&str, &str, &str, &str); 4] = [
    (
        "base",
        "Base (undistilled; validate on Base and Turbo)",
        include_str!("../../../examples/base.toml"),
        "models/Z-Image",
    ),
    (
        "turbo-adapter",
        "Turbo + training adapter (the adapter is not saved)",
        include_str!("../../../examples/turbo-adapter.toml"),
        "models/Z-Image-Turbo",
    ),
    (
        "turbo-direct",
        "Turbo directly (repair with a DistillPatch)",
        include_str!("../../../examples/turbo-direct.toml"),
        "models/Z-Image-Turbo",
    ),
    (
        "de-turbo",
        "De-Turbo",
        include_str!("../../../examples/de-turbo.toml"),
        "models/Z-Image-De-Turbo",
    ),
];

/// The form's way that makes an experiment plan (docs/validation.md): the three ways at once,
/// with the Turbo + adapter way's settings, compared in one report.
const EXPERIMENT: &str = "experiment";

/// The adapter the Turbo + adapter way suggests (a file the operator puts under models/).
const ADAPTER: &str = "models/zimage_turbo_training_adapter_v2.safetensors";
/// The trigger word of the examples, replaced in their sample prompts by the form's.
const EXAMPLE_TRIGGER: &str = "zkchar";

/// The form's fields: what was posted, over the defaults.
struct Form(HashMap<String, String>);

impl Form {
    fn defaults() -> Self {
        let pairs = [
            ("way", "turbo-adapter"),
            ("model", "models/Z-Image-Turbo"),
            ("base_model", "models/Z-Image"),
            ("adapter", ADAPTER),
            ("dataset", "datasets/tiny"),
            ("trigger", EXAMPLE_TRIGGER),
            ("resolution", "1024"),
            ("rank", "16"),
            ("steps", "3000"),
            ("learning_rate", "1e-4"),
            ("output", "runs/my-lora"),
            ("quantize", ""),
            ("gpu", "4090"),
        ];
        Form(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn posted(fields: HashMap<String, String>) -> Self {
        let mut form = Self::defaults();
        form.0.extend(fields);
        form
    }

    fn get(&self, key: &str) -> &str {
        self.0.get(key).map_or("", String::as_str)
    }

    fn number<T: std::str::FromStr>(&self, key: &str, what: &str) -> Result<T, String> {
        let v = self.get(key).trim();
        v.parse()
            .map_err(|_| format!("{key} must be {what}, got {v:?}"))
    }
}

/// What the page shows under the form: the TOML and, when checked, the verdict or the error.
struct Outcome {
    config: String,
    verdict: Option<Result<Vec<Estimate>, String>>,
}

/// The plan of one training on the chosen GPU; an experiment's name their way.
struct Estimate {
    way: Option<Mode>,
    gpu: GpuEstimate,
}

pub fn page(jobs: &Jobs) -> Answer {
    let form = Form::defaults();
    let config = config_text(&form).map_err(|e| internal(&e))?;
    let outcome = Outcome {
        config,
        verdict: None,
    };
    Ok(Reply::html(200, render(jobs, &form, &outcome)?))
}

/// `action=fields`: the TOML from the fields, checked; `action=toml`: the edited TOML,
/// checked; `action=queue`: the edited TOML queued (then the job's page).
pub fn post(jobs: &Jobs, req: &Request) -> Answer {
    let form = Form::posted(req.form());
    if form.get("action") != "queue" {
        let outcome = check(jobs, &form)?;
        return Ok(Reply::html(200, render(jobs, &form, &outcome)?));
    }
    let kind = match form.get("way") {
        EXPERIMENT => Kind::Experiment,
        _ => Kind::Train,
    };
    let id = api::queue(jobs, kind, form.get("config")).map_err(|e| {
        let message = error_text(&e);
        let outcome = Outcome {
            config: form.get("config").to_string(),
            verdict: Some(Err(message)),
        };
        match render(jobs, &form, &outcome) {
            Ok(page) => Reply::html(e.status, page),
            Err(failed) => failed,
        }
    })?;
    Ok(Reply::redirect(&format!("/jobs/{id}")))
}

/// `POST /api/plan`: the page's form as it posts it (`action=fields` or `toml`), checked as
/// "Make the TOML and check" or "Check this TOML" would → `{"config", "plans", "html"}`: the
/// TOML, the GPU's estimate of each training (`zlora plan --json`'s fields and `way`: null for
/// a training, an experiment's three by name) and the verdict box as the page shows it; 400
/// `{"error", "html"}` when there is no plan (the message in the box).
pub fn plan_json(jobs: &Jobs, req: &Request) -> Answer {
    let form = Form::posted(req.form());
    let outcome = check(jobs, &form)?;
    let Some(verdict) = &outcome.verdict else {
        return Err(internal("a checked form has a verdict"));
    };
    let html = verdict_markup(verdict).into_string();
    match verdict {
        Ok(estimates) => {
            let plans: Vec<serde_json::Value> = estimates
                .iter()
                .map(|e| {
                    let mut plan = json!(e.gpu);
                    plan["way"] = json!(e.way.map(Mode::name));
                    plan
                })
                .collect();
            Ok(Reply::json(
                200,
                &json!({"config": outcome.config, "plans": plans, "html": html}),
            ))
        }
        Err(e) => Err(Reply::json(400, &json!({"error": e, "html": html}))),
    }
}

/// The TOML of `action=fields` (made from the fields) or `action=toml` (the edited one),
/// with its verdict.
fn check(jobs: &Jobs, form: &Form) -> Result<Outcome, Reply> {
    match form.get("action") {
        "fields" => Ok(match config_text(form) {
            Ok(config) => checked(jobs, form, config),
            Err(e) => Outcome {
                config: String::new(),
                verdict: Some(Err(e)),
            },
        }),
        "toml" => Ok(checked(jobs, form, form.get("config").to_string())),
        other => Err(Reply::error(400, &format!("unknown action {other:?}"))),
    }
}

fn checked(jobs: &Jobs, form: &Form, config: String) -> Outcome {
    let verdict = Some(verdict(jobs, &config, form.get("way"), form.get("gpu")));
    Outcome { config, verdict }
}

/// The message of an error reply (`{"error": …}`).
fn error_text(reply: &Reply) -> String {
    serde_json::from_slice::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("error {}", reply.status))
}

/// The way's example config with the form's values in place (for an experiment, its plan).
fn config_text(form: &Form) -> Result<String, String> {
    let way = form.get("way");
    if way == EXPERIMENT {
        return experiment_text(form);
    }
    let (_, _, example, _) = WAYS.iter().find(|w| w.0 == way).ok_or_else(|| {
        format!("unknown way {way:?}: one of base, turbo-adapter, turbo-direct, de-turbo")
    })?;
    let mut t: Table = example.parse().map_err(|e| format!("{way} example: {e}"))?;
    let rank: i64 = form.number("rank", "a whole number")?;
    let trigger = form.get("trigger").trim().to_string();
    set(&mut t, "model", "path", form.get("model").into());
    if way == "turbo-adapter" {
        set(
            &mut t,
            "model",
            "training_adapter",
            form.get("adapter").into(),
        );
    }
    set(&mut t, "dataset", "path", form.get("dataset").into());
    set(&mut t, "dataset", "trigger", trigger.clone().into());
    let resolution: i64 = form.number("resolution", "a whole number of pixels")?;
    set(&mut t, "dataset", "resolution", resolution.into());
    set(&mut t, "lora", "rank", rank.into());
    set(&mut t, "lora", "alpha", rank.into());
    let steps: i64 = form.number("steps", "a whole number")?;
    set(&mut t, "train", "steps", steps.into());
    let quantize = form.get("quantize");
    if !quantize.is_empty() {
        set(&mut t, "model", "quantize", quantize.into());
    }
    let lr: f64 = form.number("learning_rate", "a number")?;
    set(&mut t, "train", "learning_rate", lr.into());
    set(&mut t, "train", "output", form.get("output").into());
    if let Some(Value::Array(prompts)) = t
        .get_mut("sample")
        .and_then(|s| s.as_table_mut())
        .and_then(|s| s.get_mut("prompts"))
    {
        for p in prompts.iter_mut() {
            if let Value::String(s) = p {
                *s = s.replace(EXAMPLE_TRIGGER, &trigger);
            }
        }
    }
    let text = toml::to_string(&t).map_err(|e| e.to_string())?;
    TrainConfig::parse(&text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// The experiment plan of the form: the Turbo + adapter way's config from the same fields,
/// its `[model]` becoming the plan's `turbo` and `training_adapter` (with `base` from its own
/// field), its `[train] output` the plan's `output` (each way's run goes under it).
fn experiment_text(form: &Form) -> Result<String, String> {
    if !form.get("quantize").is_empty() {
        return Err("an experiment plan has no [model] quantize: choose the transformer storage \"as the model\"".into());
    }
    let mut fields = form.0.clone();
    fields.insert("way".into(), "turbo-adapter".into());
    let mut t: Table = config_text(&Form(fields))?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut take = |section: &str, key: &str| {
        t.get_mut(section)
            .and_then(Value::as_table_mut)
            .and_then(|s| s.remove(key))
            .ok_or_else(|| format!("the turbo-adapter example has no [{section}] {key}"))
    };
    let turbo = take("model", "path")?;
    let adapter = take("model", "training_adapter")?;
    let output = take("train", "output")?;
    t.remove("model");
    t.insert("output".into(), output);
    t.insert("base".into(), form.get("base_model").into());
    t.insert("turbo".into(), turbo);
    t.insert("training_adapter".into(), adapter);
    let text = toml::to_string(&t).map_err(|e| e.to_string())?;
    ExperimentPlan::parse(Path::new("the experiment plan"), &text).map_err(|e| e.to_string())?;
    Ok(text)
}

fn set(t: &mut Table, section: &str, key: &str, value: Value) {
    if let Some(Value::Table(s)) = t.get_mut(section) {
        s.insert(key.to_string(), value);
    }
}

/// `zlora plan` for one GPU of the built-in table, on the config as the job would run it
/// (paths resolved inside DIR; a model folder that is not there is planned from the
/// variant's published sizes, as `zlora plan` does); for an experiment, each way's training.
fn verdict(jobs: &Jobs, text: &str, way: &str, gpu: &str) -> Result<Vec<Estimate>, String> {
    let trainings = if way == EXPERIMENT {
        let checked = check_config(&jobs.root, Kind::Experiment, text).map_err(|r| r.0)?;
        let plan = ExperimentPlan::parse(Path::new("the experiment plan"), &checked.toml)
            .map_err(|e| format!("config: {e}"))?;
        experiment::WAYS
            .into_iter()
            .zip(plan.arms)
            .map(|(w, arm)| (Some(w), arm.config))
            .collect()
    } else {
        let checked = check_config(&jobs.root, Kind::Train, text).map_err(|r| r.0)?;
        let cfg = TrainConfig::parse(&checked.toml).map_err(|e| format!("config: {e}"))?;
        vec![(None, cfg)]
    };
    trainings
        .into_iter()
        .map(|(way, cfg)| estimate(&cfg, gpu).map(|gpu| Estimate { way, gpu }))
        .collect()
}

fn estimate(cfg: &TrainConfig, gpu: &str) -> Result<GpuEstimate, String> {
    let opts = PlanOptions {
        gpus: vec![gpu.to_string()],
        table: GpuTable::built_in().map_err(|e| e.to_string())?,
        caption_tokens: MAX_CAPTION_TOKENS,
        bandwidth_mb_s: 100.0,
        storage_days: 30.0,
    };
    let p = plan(cfg, &opts).map_err(|e| format!("plan: {e}"))?;
    p.gpus
        .into_iter()
        .next()
        .ok_or_else(|| format!("plan: no estimate for GPU {gpu:?}"))
}

fn render(jobs: &Jobs, form: &Form, outcome: &Outcome) -> Result<Markup, Reply> {
    let gpus = GpuTable::built_in().map_err(internal)?.gpus;
    let datasets = api::datasets(jobs)?;
    let field = |key: &str, label: &str| {
        html! { label { (label) " " input name=(key) value=(form.get(key)); } }
    };
    Ok(layout(
        "New run",
        html! {
            form #new-run method="post" action="/new" data-plan="/api/plan" {
                fieldset {
                    legend { "Way" }
                    @for (value, label, _, model) in &WAYS {
                        label.way {
                            input type="radio" name="way" value=(value) checked[form.get("way") == *value];
                            (label) " " span.muted { "(model e.g. " code { (model) } ")" }
                        }
                    }
                    label.way {
                        input type="radio" name="way" value=(EXPERIMENT) checked[form.get("way") == EXPERIMENT];
                        "Experiment: Base, Turbo + adapter and Turbo directly with these settings, validated and compared "
                        span.muted { "(the model is Turbo; the Base model below)" }
                    }
                }
                (field("model", "Model folder"))
                (field("base_model", "Base model folder (experiment only)"))
                (field("adapter", "Training adapter (Turbo + adapter and experiment)"))
                label { "Dataset " input name="dataset" value=(form.get("dataset")) list="datasets"; }
                datalist #datasets { @for (name, _) in &datasets { option value=(format!("datasets/{name}")) {} } }
                (field("trigger", "Trigger word"))
                (field("resolution", "Resolution"))
                (field("rank", "Rank (alpha = rank)"))
                (field("steps", "Steps"))
                (field("learning_rate", "Learning rate"))
                (field("output", "Output folder"))
                label { "Transformer storage "
                    select name="quantize" {
                        option value="" selected[form.get("quantize").is_empty()] { "as the model (no quantization)" }
                        @for q in Quantization::ALL {
                            @let name = q.to_string();
                            option value=(name) selected[form.get("quantize") == name] { (name) }
                        }
                    }
                }
                label { "GPU "
                    select name="gpu" {
                        @for g in &gpus { option value=(g.name) selected[form.get("gpu") == g.name] { (g.label) } }
                    }
                }
                p { button name="action" value="fields" { "Make the TOML and check" } }
                h2 { "Config" }
                p.muted { "Edit freely (docs/training.md lists every key); paths are read from the app's folder." }
                textarea name="config" rows="24" cols="80" spellcheck="false" { (outcome.config) }
                p {
                    button name="action" value="toml" { "Check this TOML" }
                    " "
                    button name="action" value="queue" { "Queue this run" }
                }
            }
            @match &outcome.verdict {
                Some(v) => (verdict_markup(v)),
                None => section #verdict {},
            }
        },
    ))
}

fn verdict_markup(v: &Result<Vec<Estimate>, String>) -> Markup {
    let estimates = match v {
        Err(e) => return html! { section #verdict { h2 { "Plan" } p.error { (e) } } },
        Ok(estimates) => estimates,
    };
    let label = estimates.first().map_or("", |e| e.gpu.label.as_str());
    let hours: f64 = estimates.iter().map(|e| e.gpu.total_hours).sum();
    let cost: f64 = estimates.iter().map(|e| e.gpu.cost_usd).sum();
    html! {
        section #verdict {
            h2 { "Plan: " (label) }
            @for e in estimates {
                @if let Some(way) = e.way { h3 { (way.name()) } }
                (estimate_markup(&e.gpu))
            }
            @if estimates.len() > 1 {
                p { "In all: " (format!("{hours:.2}")) " h · $" (format!("{cost:.2}")) " (the trainings; validation not counted)" }
            }
        }
    }
}

fn estimate_markup(g: &GpuEstimate) -> Markup {
    html! {
        p class=(if g.fits { "fits" } else { "error" }) {
            @if g.fits { "Fits: " } @else { "Does not fit: " }
            "peak " (format!("{:.1}", g.peak_memory_gib)) " GiB of " (format!("{:.0}", g.memory_gib)) " GiB"
        }
        p {
            (format!("{:.2}", g.seconds_per_step)) " s/step · "
            (format!("{:.2}", g.total_hours)) " h · $"
            (format!("{:.2}", g.cost_usd)) " at $" (format!("{:.2}", g.usd_per_hour)) "/h"
        }
        @if !g.changes.is_empty() {
            ul { @for c in &g.changes {
                li { (c.change) ": " (format!("{:.1}", c.peak_memory_gib)) " GiB" @if c.fits { " (fits)" } }
            } }
        }
    }
}
