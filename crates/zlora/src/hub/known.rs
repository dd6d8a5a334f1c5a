//! The Hugging Face repositories zlora knows by name, which of their files it needs, and the
//! sizes `zlora plan` quotes for them when they are not on disk.

/// Which files of a repository zlora downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed {
    /// A diffusers pipeline: configs, the transformer, text encoder and VAE weights and the
    /// tokenizer; no READMEs, images, `.git*` files or duplicate weight formats.
    Pipeline,
    /// A transformers vision-language model for `zlora caption`: the top-level configs,
    /// tokenizer, processor config and safetensors weights (with their shard index).
    Vlm,
    /// Exactly these files.
    Files(&'static [&'static str]),
    /// A repository zlora has no entry for: a pipeline if it has `model_index.json`, otherwise
    /// its safetensors weights and JSON configs.
    Guess,
}

/// A repository with a short name on the command line.
#[derive(Debug, Clone, Copy)]
pub struct KnownRepo {
    pub alias: &'static str,
    pub repo: &'static str,
    pub needed: Needed,
    pub about: &'static str,
}

pub const BASE_REPO: &str = "Tongyi-MAI/Z-Image";
pub const TURBO_REPO: &str = "Tongyi-MAI/Z-Image-Turbo";
pub const DE_TURBO_REPO: &str = "ostris/Z-Image-De-Turbo";
pub const ADAPTER_REPO: &str = "ostris/zimage_turbo_training_adapter";
pub const ADAPTER_FILE: &str = "zimage_turbo_training_adapter_v2.safetensors";
pub const DISTILL_PATCH_REPO: &str = "DiffSynth-Studio/Z-Image-Turbo-DistillPatch";
pub const DISTILL_PATCH_FILE: &str = "model.safetensors";

pub const KNOWN: [KnownRepo; 7] = [
    KnownRepo {
        alias: "base",
        repo: BASE_REPO,
        needed: Needed::Pipeline,
        about: "Z-Image (Base), the undistilled model; transformer stored in bf16",
    },
    KnownRepo {
        alias: "turbo",
        repo: TURBO_REPO,
        needed: Needed::Pipeline,
        about: "Z-Image-Turbo, the 8-step distilled model; transformer stored in f32",
    },
    KnownRepo {
        alias: "adapter",
        repo: ADAPTER_REPO,
        needed: Needed::Files(&[ADAPTER_FILE]),
        about: "ostris's training adapter v2 (de-distillation LoRA for training on Turbo)",
    },
    KnownRepo {
        alias: "distill-patch",
        repo: DISTILL_PATCH_REPO,
        needed: Needed::Files(&[DISTILL_PATCH_FILE]),
        about: "DiffSynth's DistillPatch LoRA (restores 8-step sampling of direct Turbo LoRAs)",
    },
    KnownRepo {
        alias: "qwen3-vl-2b",
        repo: "Qwen/Qwen3-VL-2B-Instruct",
        needed: Needed::Vlm,
        about: "Qwen3-VL 2B Instruct, the smallest captioner for zlora caption",
    },
    KnownRepo {
        alias: "qwen3-vl-4b",
        repo: "Qwen/Qwen3-VL-4B-Instruct",
        needed: Needed::Vlm,
        about: "Qwen3-VL 4B Instruct, the default captioner for zlora caption",
    },
    KnownRepo {
        alias: "qwen3-vl-8b",
        repo: "Qwen/Qwen3-VL-8B-Instruct",
        needed: Needed::Vlm,
        about: "Qwen3-VL 8B Instruct, the most detailed captioner for zlora caption",
    },
];

/// A file of `repo` in the local Hugging Face cache (at its `main` ref), if it is there.
pub fn cached(repo: &str, file: &str) -> Option<std::path::PathBuf> {
    crate::model::folder::hf_cache()
        .model(repo.to_string())
        .get(file)
}

/// The repository and file selection for a command-line name: an alias or an `org/name` id.
pub fn resolve(name: &str) -> Option<(String, Needed)> {
    if let Some(known) = KNOWN.iter().find(|k| k.alias == name || k.repo == name) {
        return Some((known.repo.to_string(), known.needed));
    }
    let mut parts = name.split('/');
    let valid = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    (valid(parts.next()) && valid(parts.next()) && parts.next().is_none())
        .then(|| (name.to_string(), Needed::Guess))
}

/// Whether zlora needs `path` (a file of the repository) under the selection `needed`;
/// `has_index` says whether the repository has a `model_index.json` (for [`Needed::Guess`]).
pub fn wanted(needed: Needed, path: &str, has_index: bool) -> bool {
    match needed {
        Needed::Files(files) => files.contains(&path),
        Needed::Pipeline => pipeline_file(path),
        Needed::Vlm => vlm_file(path),
        Needed::Guess if has_index => pipeline_file(path),
        Needed::Guess => {
            !path.starts_with('.') && (path.ends_with(".safetensors") || path.ends_with(".json"))
        }
    }
}

/// The files of a diffusers pipeline that zlora reads (model/folder.rs): every component's
/// config and safetensors weights (with their shard index), the scheduler config and the
/// tokenizer's `tokenizer.json` / `tokenizer_config.json`.
fn pipeline_file(path: &str) -> bool {
    const COMPONENTS: [&str; 3] = ["transformer/", "text_encoder/", "vae/"];
    let in_component = COMPONENTS
        .iter()
        .any(|c| path.strip_prefix(c).is_some_and(|rest| !rest.contains('/')));
    path == "model_index.json"
        || path == "scheduler/scheduler_config.json"
        || path == "tokenizer/tokenizer.json"
        || path == "tokenizer/tokenizer_config.json"
        || (in_component
            && (path.ends_with("/config.json")
                || path.ends_with(".safetensors")
                || path.ends_with(".safetensors.index.json")))
}

/// The files of a Qwen3-VL repository that `zlora caption` reads (caption::VlmFolder).
fn vlm_file(path: &str) -> bool {
    const CONFIGS: [&str; 5] = [
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    !path.contains('/')
        && (CONFIGS.contains(&path)
            || path.ends_with(".safetensors")
            || path.ends_with(".safetensors.index.json"))
}

/// One part of a download, with its size and where the size comes from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Part {
    pub what: &'static str,
    pub repo: &'static str,
    /// The one file of a single-file part (adapters), which the local cache may hold.
    pub file: Option<&'static str>,
    pub bytes: u64,
    /// Why this is the size (a computation or the Hub's file page).
    pub basis: &'static str,
}

/// 6,154,908,736 transformer parameters (reference §1.2, checked by a test against the model
/// code) stored as f32 (Turbo) or bf16 (Base, De-Turbo).
pub const TRANSFORMER_PARAMS: u64 = 6_154_908_736;
/// Qwen3-4B without lm_head (tied): 151,936 × 2,560 embedding + 36 layers of 100,930,816 +
/// the final norm = 4,022,468,096 parameters, stored as bf16.
pub const TEXT_ENCODER_PARAMS: u64 = 4_022_468_096;

const TRANSFORMER_F32: &str =
    "computed: 6,154,908,736 parameters × 4 bytes (the Hub shows 9.97 + 9.97 + 4.67 GB shards)";
const TRANSFORMER_BF16: &str =
    "computed: 6,154,908,736 parameters × 2 bytes (the Hub shows ~12.3 GB)";

/// The parts of a Z-Image pipeline besides the transformer, as stored in both Tongyi repos.
fn pipeline_rest(repo: &'static str) -> [Part; 3] {
    [
        Part {
            what: "text encoder (Qwen3-4B, bf16)",
            repo,
            file: None,
            bytes: TEXT_ENCODER_PARAMS * 2,
            basis: "computed: 4,022,468,096 parameters × 2 bytes (the Hub shows ~8.05 GB)",
        },
        Part {
            what: "VAE (bf16)",
            repo,
            file: None,
            bytes: 167_700_000,
            basis: "the Hub's file page (168 MB)",
        },
        Part {
            what: "tokenizer and configs",
            repo,
            file: None,
            bytes: 11_500_000,
            basis: "tokenizer.json 11.4 MB (Qwen3) plus a few KB of JSON",
        },
    ]
}

/// What training a variant needs from the Hub, transformer first.
pub fn variant_parts(variant: crate::train::config::Variant) -> Vec<Part> {
    use crate::train::config::Variant;
    let (transformer, rest_repo) = match variant {
        Variant::Turbo => (
            Part {
                what: "transformer (f32)",
                repo: TURBO_REPO,
                file: None,
                bytes: TRANSFORMER_PARAMS * 4,
                basis: TRANSFORMER_F32,
            },
            TURBO_REPO,
        ),
        Variant::Base => (
            Part {
                what: "transformer (bf16)",
                repo: BASE_REPO,
                file: None,
                bytes: TRANSFORMER_PARAMS * 2,
                basis: TRANSFORMER_BF16,
            },
            BASE_REPO,
        ),
        Variant::DeTurbo => (
            Part {
                what: "transformer (De-Turbo, bf16 single file)",
                repo: DE_TURBO_REPO,
                file: None,
                bytes: TRANSFORMER_PARAMS * 2,
                basis: TRANSFORMER_BF16,
            },
            TURBO_REPO,
        ),
    };
    std::iter::once(transformer)
        .chain(pipeline_rest(rest_repo))
        .collect()
}

pub fn adapter_part() -> Part {
    Part {
        what: "training adapter v2",
        repo: ADAPTER_REPO,
        file: Some(ADAPTER_FILE),
        bytes: 340_194_488,
        basis: "the Hub's file page (340,194,488 bytes)",
    }
}

pub fn distill_patch_part() -> Part {
    Part {
        what: "DistillPatch (for sampling a direct Turbo LoRA at 8 steps)",
        repo: DISTILL_PATCH_REPO,
        file: Some(DISTILL_PATCH_FILE),
        bytes: 318_000_000,
        basis: "the Hub's file page (318 MB)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_ids_resolve_and_junk_does_not() {
        assert_eq!(resolve("turbo").map(|r| r.0), Some(TURBO_REPO.to_string()));
        assert_eq!(resolve(TURBO_REPO).map(|r| r.1), Some(Needed::Pipeline));
        assert_eq!(resolve("a/b").map(|r| r.1), Some(Needed::Guess));
        for bad in ["", "turbo2", "a/b/c", "../x", "a/..", "a b/c", "a/"] {
            assert!(resolve(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_pipeline_selection_keeps_weights_and_configs_only() {
        let keep = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "text_encoder/model-00001-of-00003.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "tokenizer/tokenizer.json",
        ];
        let skip = [
            "README.md",
            ".gitattributes",
            "assets/showcase.jpg",
            "tokenizer/merges.txt",
            "transformer/diffusion_pytorch_model.bin",
            "vae/sub/x.safetensors",
        ];
        for p in keep {
            assert!(wanted(Needed::Pipeline, p, true), "{p}");
        }
        for p in skip {
            assert!(!wanted(Needed::Pipeline, p, true), "{p}");
        }
        assert!(wanted(Needed::Guess, "lora.safetensors", false));
        for p in [
            "config.json",
            "preprocessor_config.json",
            "model-00001-of-00002.safetensors",
        ] {
            assert!(wanted(Needed::Vlm, p, false), "{p}");
        }
        for p in [
            "README.md",
            "vocab.json",
            "merges.txt",
            "sub/model.safetensors",
        ] {
            assert!(!wanted(Needed::Vlm, p, false), "{p}");
        }
        assert_eq!(resolve("qwen3-vl-4b").map(|r| r.1), Some(Needed::Vlm));
        assert!(!wanted(Needed::Guess, "README.md", false));
        assert!(!wanted(Needed::Guess, ".hidden.json", false));
    }
}
