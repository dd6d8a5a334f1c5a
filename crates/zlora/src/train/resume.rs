//! What `--resume` accepts: the config saved with the newest checkpoint against the current
//! one. A change to anything a step computes (learning rate, rank, data, seed, model, ...)
//! would mix two trainings in one LoRA and is refused; the keys that only decide when the run
//! stops, how often it saves, what it samples or where it logs change when `--allow-changes` names them.

use std::collections::BTreeMap;

use super::config::TrainConfig;
use crate::{Error, Result};

/// Keys (or whole sections) that may change on resume when named in `--allow-changes`.
pub const SAFE_KEYS: &[&str] = &[
    "train.steps",
    "train.save_every",
    "train.gradient_checkpointing",
    "model.blocks_on_device",
    "sample",
    "output",
    "log",
];

/// Never a change: the output folder is the one being resumed, wherever it now is.
const IGNORED: &[&str] = &["train.output"];

/// Checks the current config against the saved one (TOML text); returns the accepted
/// changes as `key: old → new` lines.
pub fn check_changes(saved: &str, now: &TrainConfig, allowed: &[String]) -> Result<Vec<String>> {
    for a in allowed {
        if !SAFE_KEYS.iter().any(|s| names(a, s) || under(a, s)) {
            return Err(Error::Invalid(format!(
                "--allow-changes {a}: only {} may change on resume",
                SAFE_KEYS.join(", ")
            )));
        }
    }
    let saved: toml::Value = toml::from_str(saved)
        .map_err(|e| Error::Invalid(format!("the checkpoint's saved config is unreadable: {e}")))?;
    let now = toml::Value::try_from(now).map_err(|e| Error::Invalid(e.to_string()))?;
    let (safe, math): (Vec<_>, Vec<_>) = changed(&saved, &now)
        .into_iter()
        .partition(|(k, _)| SAFE_KEYS.iter().any(|s| k == s || under(k, s)));
    if !math.is_empty() {
        return Err(Error::Invalid(format!(
            "--resume: the config changed since the checkpoint in what training computes ({}); resuming would mix two trainings in one LoRA: restore these values, or start a new run (another output folder, or --force)",
            describe(&math)
        )));
    }
    let refused: Vec<_> = safe
        .iter()
        .filter(|(k, _)| !allowed.iter().any(|a| names(a, k) || under(k, a)))
        .cloned()
        .collect();
    if !refused.is_empty() {
        let keys: Vec<&str> = refused.iter().map(|(k, _)| k.as_str()).collect();
        return Err(Error::Invalid(format!(
            "--resume: the config changed since the checkpoint ({}): pass --allow-changes {} to accept",
            describe(&refused),
            keys.join(" ")
        )));
    }
    Ok(safe
        .iter()
        .map(|c| describe(std::slice::from_ref(c)))
        .collect())
}

/// `a` names the dotted key `k` in full or by its last part (`steps` for `train.steps`).
fn names(a: &str, k: &str) -> bool {
    k == a || k.ends_with(&format!(".{a}"))
}

/// `k` lies inside the section `s`.
fn under(k: &str, s: &str) -> bool {
    k.starts_with(&format!("{s}."))
}

type Change = (String, String);

/// The dotted keys whose values differ, with "old → new".
fn changed(saved: &toml::Value, now: &toml::Value) -> Vec<Change> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", saved, &mut a);
    flatten("", now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
    keys.into_iter()
        .filter(|k| !IGNORED.contains(&k.as_str()) && a.get(*k) != b.get(*k))
        .map(|k| {
            let old = show(a.get(k));
            let new = show(b.get(k));
            (k.clone(), format!("{} → {}", short(&old), short(&new)))
        })
        .collect()
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn short(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn describe(changes: &[Change]) -> String {
    changes
        .iter()
        .map(|(k, d)| format!("{k}: {d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[model]
path = "m"
variant = "turbo"
[dataset]
path = "d"
resolution = 32
[lora]
rank = 2
alpha = 2
[train]
steps = 6
learning_rate = 1e-3
output = "out"
"#;

    fn cfg(edit: &str, with: &str) -> TrainConfig {
        TrainConfig::parse(&CONFIG.replace(edit, with)).unwrap()
    }

    fn saved() -> String {
        toml::to_string(&cfg("", "")).unwrap()
    }

    #[test]
    fn the_same_config_or_another_output_folder_passes() {
        assert!(check_changes(&saved(), &cfg("", ""), &[])
            .unwrap()
            .is_empty());
        let moved = cfg("output = \"out\"", "output = \"elsewhere/out\"");
        assert!(check_changes(&saved(), &moved, &[]).unwrap().is_empty());
    }

    #[test]
    fn a_change_to_the_math_is_refused_listing_the_keys_whatever_is_allowed() {
        let now = cfg("rank = 2", "rank = 4");
        let now = TrainConfig {
            train: cfg("learning_rate = 1e-3", "learning_rate = 1e-2").train,
            ..now
        };
        let e = check_changes(&saved(), &now, &["steps".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora.rank: 2 → 4") && e.contains("train.learning_rate"),
            "{e}"
        );
        let e = check_changes(&saved(), &now, &["rank".into()]).unwrap_err();
        assert!(e.to_string().contains("--allow-changes rank"), "{e}");
    }

    /// Another optimizer's state would not even load; its change is refused up front.
    #[test]
    fn a_change_of_optimizer_is_refused() {
        let now = cfg(
            "output = \"out\"",
            "output = \"out\"\noptimizer = \"prodigy\"",
        );
        let e = check_changes(&saved(), &now, &[]).unwrap_err().to_string();
        assert!(e.contains("train.optimizer"), "{e}");
    }

    #[test]
    fn safe_changes_need_to_be_named() {
        let now = cfg("steps = 6", "steps = 9");
        let e = check_changes(&saved(), &now, &[]).unwrap_err().to_string();
        assert!(e.contains("--allow-changes train.steps"), "{e}");
        for name in ["steps", "train.steps"] {
            let ok = check_changes(&saved(), &now, &[name.into()]).unwrap();
            assert_eq!(ok, vec!["train.steps: 6 → 9".to_string()]);
        }
        let sample =
            TrainConfig::parse(&format!("{CONFIG}[sample]\nevery = 2\nprompts = [\"x\"]")).unwrap();
        assert!(check_changes(&saved(), &sample, &["sample".into()]).is_ok());
    }

    /// Block swap moves weights, not numbers (a test holds swapped steps to the unswapped
    /// ones bit for bit): a resumed run may change it when told to.
    #[test]
    fn blocks_on_device_may_change_when_named() {
        let swapped = cfg(
            "variant = \"turbo\"",
            "variant = \"turbo\"\nblocks_on_device = 3",
        );
        let e = check_changes(&saved(), &swapped, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--allow-changes model.blocks_on_device"), "{e}");
        let ok = check_changes(&saved(), &swapped, &["blocks_on_device".into()]).unwrap();
        assert_eq!(ok.len(), 1, "{ok:?}");
        assert!(ok[0].starts_with("model.blocks_on_device"), "{ok:?}");
    }
}
