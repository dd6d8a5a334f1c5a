//! Alpha and rank from the diffusers / PEFT header entry `lora_adapter_metadata`.
//!
//! diffusers and SimpleTuner save the PEFT `LoraConfig` there as JSON with component-prefixed
//! keys (`transformer.lora_alpha`, `transformer.r`, `transformer.alpha_pattern`, ...), and a
//! user's `--lora_alpha` lives nowhere else, so ignoring it would mis-scale the LoRA.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

const HEADER_KEY: &str = "lora_adapter_metadata";
const COMPONENT: &str = "transformer.";

/// The parts of a PEFT `LoraConfig` that change the math.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PeftConfig {
    alpha: Option<f64>,
    rank: Option<usize>,
    /// Pattern → alpha / rank; matched in key order, the first match wins (as in PEFT).
    alpha_pattern: Vec<(String, f64)>,
    rank_pattern: Vec<(String, usize)>,
    /// rsLoRA scales by alpha / sqrt(rank).
    rslora: bool,
}

impl PeftConfig {
    /// Reads the config from the header, `None` when the file has none for the transformer.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        let Some(text) = meta.get(HEADER_KEY) else {
            return Ok(None);
        };
        let json: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| format!("header {HEADER_KEY} is not a JSON object: {e}"))?;
        let get = |k: &str| json.get(&format!("{COMPONENT}{k}"));
        let config = PeftConfig {
            alpha: get("lora_alpha")
                .map(|v| number(v, "lora_alpha"))
                .transpose()?,
            rank: get("r").map(|v| count(v, "r")).transpose()?,
            alpha_pattern: pattern(get("alpha_pattern"), "alpha_pattern", number)?,
            rank_pattern: pattern(get("rank_pattern"), "rank_pattern", count)?,
            rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        };
        let empty = config.alpha.is_none()
            && config.rank.is_none()
            && config.alpha_pattern.is_empty()
            && config.rank_pattern.is_empty();
        Ok((!empty).then_some(config))
    }

    /// alpha / rank for `module` (a diffusers path) whose tensors have rank `rank`.
    pub fn scale(&self, module: &str, rank: usize) -> Result<f64, String> {
        let header_rank = find(&self.rank_pattern, module).or(self.rank);
        if let Some(r) = header_rank.filter(|&r| r != rank) {
            return Err(format!(
                "header {HEADER_KEY} gives rank {r} for {module} but its tensors have rank {rank}"
            ));
        }
        // PEFT's default: no alpha means alpha = rank.
        let alpha = find(&self.alpha_pattern, module)
            .or(self.alpha)
            .unwrap_or(rank as f64);
        let divisor = if self.rslora {
            (rank as f64).sqrt()
        } else {
            rank as f64
        };
        Ok(alpha / divisor)
    }
}

/// Whether the header's PEFT config says the transformer adapters are DoRA.
pub(crate) fn declares_dora(meta: &BTreeMap<String, String>) -> bool {
    meta.get(HEADER_KEY)
        .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok())
        .and_then(|json| json.get(&format!("{COMPONENT}use_dora"))?.as_bool())
        == Some(true)
}

fn number(v: &Value, what: &str) -> Result<f64, String> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("header {HEADER_KEY}: {COMPONENT}{what} = {v} is not a number"))
}

fn count(v: &Value, what: &str) -> Result<usize, String> {
    v.as_u64()
        .filter(|&x| x > 0)
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| format!("header {HEADER_KEY}: {COMPONENT}{what} = {v} is not a rank"))
}

/// PEFT pattern keys are regexes matched against the end of a module path. Plain module
/// names (the only kind trainers write) behave as literal suffixes; anything that needs a
/// regex engine is refused rather than silently not matched.
fn pattern<T>(
    v: Option<&Value>,
    what: &str,
    parse: fn(&Value, &str) -> Result<T, String>,
) -> Result<Vec<(String, T)>, String> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let Value::Object(map) = v else {
        return Err(format!(
            "header {HEADER_KEY}: {COMPONENT}{what} is not an object"
        ));
    };
    map.iter()
        .map(|(k, v)| {
            if k.chars().any(|c| "^$*+?()[]{}|\\".contains(c)) {
                return Err(format!(
                    "header {HEADER_KEY}: regex pattern {k:?} in {COMPONENT}{what} is not supported"
                ));
            }
            Ok((k.clone(), parse(v, what)?))
        })
        .collect()
}

fn find<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(k, _)| {
            module == k
                || module
                    .strip_suffix(k.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<Option<PeftConfig>, String> {
        let meta = BTreeMap::from([(HEADER_KEY.to_string(), json.to_string())]);
        PeftConfig::from_metadata(&meta)
    }

    #[test]
    fn header_alpha_and_patterns() {
        let c = config(
            r#"{"transformer.r": 4, "transformer.lora_alpha": 8,
                "transformer.alpha_pattern": {"to_out.0": 2},
                "transformer.rank_pattern": {"layers.1.attention.to_q": 2}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.scale("layers.0.attention.to_q", 4), Ok(2.0));
        assert_eq!(c.scale("layers.0.attention.to_out.0", 4), Ok(0.5));
        assert_eq!(c.scale("layers.1.attention.to_q", 2), Ok(4.0));
        assert!(c
            .scale("layers.0.attention.to_k", 8)
            .unwrap_err()
            .contains("rank 4"));
        // A suffix must start at a path boundary.
        assert_eq!(find(&c.alpha_pattern, "layers.0.attention.xto_out.0"), None);
    }

    #[test]
    fn rslora_missing_and_refused_configs() {
        let c = config(r#"{"transformer.lora_alpha": 8, "transformer.use_rslora": true}"#);
        assert_eq!(c.unwrap().unwrap().scale("m", 4), Ok(4.0));
        assert_eq!(config(r#"{"text_encoder.r": 4}"#), Ok(None));
        let dora = BTreeMap::from([(
            HEADER_KEY.to_string(),
            r#"{"transformer.use_dora": true}"#.to_string(),
        )]);
        assert!(declares_dora(&dora));
        assert!(config(r#"{"transformer.alpha_pattern": {"to_.*": 1}}"#).is_err());
        assert!(config(r#"{"transformer.lora_alpha": "x"}"#).is_err());
        assert!(config("not json").is_err());
    }
}
