//! The verdicts as readable lines: what was checked, what was measured, the rule, the result.
//! The report's table and the command's summary print the same findings.

use super::html::State;
use super::metrics::{
    EffectCheck, EffectVerdict, BLUR_RATIO, COLLAPSE_RATIO, NOT_LEARNING_EFFECT, OVERFIT_EFFECT,
};
use super::plan::Sampling;
use super::verdicts::{BlurCheck, PatchVerdict, Verdicts};

#[derive(Debug, Clone)]
pub struct Finding {
    pub check: String,
    pub measured: String,
    pub rule: String,
    pub verdict: String,
    pub state: Option<State>,
}

pub fn effect_rule() -> String {
    format!(
        "not learning: effect < {NOT_LEARNING_EFFECT}; overfit: effect ≥ {OVERFIT_EFFECT} and diversity kept < {COLLAPSE_RATIO}"
    )
}

pub fn effect_state(v: EffectVerdict) -> State {
    match v {
        EffectVerdict::Learning => State::Good,
        EffectVerdict::NotLearning | EffectVerdict::Overfit => State::Bad,
    }
}

pub fn effect_measured(c: &EffectCheck) -> String {
    let diversity = c
        .diversity_ratio
        .map_or("n/a (one image)".to_string(), |d| format!("{d:.2}"));
    format!("effect {:.3}; diversity kept {diversity}", c.effect)
}

fn effect_finding(check: String, c: &EffectCheck) -> Finding {
    Finding {
        check,
        measured: effect_measured(c),
        rule: effect_rule(),
        verdict: c.verdict.label().into(),
        state: Some(effect_state(c.verdict)),
    }
}

fn blur_measured(b: &BlurCheck, long_steps: usize) -> String {
    format!(
        "sharpness ×{:.2} against {long_steps} steps, ×{:.2} against Turbo without LoRA",
        b.vs_long, b.vs_plain
    )
}

fn blur_verdict(b: &BlurCheck) -> (&'static str, State) {
    if b.blurred {
        ("blurred", State::Bad)
    } else {
        ("sharp", State::Good)
    }
}

/// Every finding of one validation, in report order.
pub fn findings(v: &Verdicts, s: &Sampling) -> Vec<Finding> {
    let fast = s.turbo.steps;
    let mut out = vec![
        effect_finding("LoRA effect on Base".into(), &v.base),
        effect_finding(format!("LoRA effect on Turbo ({fast} steps)"), &v.turbo),
    ];
    let (verdict, state) = blur_verdict(&v.blur);
    out.push(Finding {
        check: format!("Blur at {fast} steps"),
        measured: blur_measured(&v.blur, s.turbo_long.steps),
        rule: format!("blurred: either ratio < {BLUR_RATIO}"),
        verdict: verdict.into(),
        state: Some(state),
    });
    out.push(Finding {
        check: "Base → Turbo retention".into(),
        measured: v
            .retention_pct
            .map_or("n/a: no effect on Base".into(), |r| format!("{r:.0} %")),
        rule: "100 · effect on Turbo / effect on Base".into(),
        verdict: String::new(),
        state: None,
    });
    if let Some(p) = &v.patch {
        let state = match p.verdict {
            PatchVerdict::NotNeeded | PatchVerdict::Repairs => State::Good,
            PatchVerdict::DoesNotRepair => State::Bad,
        };
        out.push(Finding {
            check: "DistillPatch repair".into(),
            measured: format!(
                "with the patch: {}; effect {:.3} with, {:.3} without",
                blur_measured(&p.with, s.turbo_long.steps),
                p.effect_with,
                p.effect_without
            ),
            rule: format!("repairs: blurred without the patch, not with it (ratio ≥ {BLUR_RATIO})"),
            verdict: p.verdict.label().into(),
            state: Some(state),
        });
    }
    out
}
