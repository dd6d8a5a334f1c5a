//! What the estimates are computed from: the transformer's Linears, the text encoder's and the
//! VAE's sizes, the trained LoRA and the training adapter. Read from the local model folder
//! when the configuration names one; the released Z-Image's are built in otherwise, so a plan
//! needs no download. Parameter lists come from the model code itself (built over a recorder
//! that allocates nothing), so they cannot drift from what training loads.

use std::path::{Path, PathBuf};

use crate::hub::known;
use crate::lora::LoraFile;
pub use crate::model::dit::STACKS;
use crate::model::folder::ModelFolder;
use crate::model::text::{Qwen3TextEncoder, TextEncoderConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::model::weights::{component_files, expected_tensors, recorded_tensors};
use crate::model::TransformerConfig;
use crate::nn::{AdapterWeights, Factor};
use crate::train::config::{TrainConfig, Variant};
use crate::train::lora::{Algorithm, FactorShape, LoraConfig};
use crate::{Error, Result};

/// One Linear of the transformer: its module path and weight shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub path: String,
    pub out: usize,
    pub inp: usize,
}

impl Linear {
    pub fn params(&self) -> u64 {
        (self.out * self.inp) as u64
    }

    pub fn stack(&self) -> Option<&'static str> {
        stack_of(&self.path)
    }

    /// The module path inside its block, e.g. "attention.to_q".
    pub fn module(&self) -> &str {
        self.path.splitn(3, '.').nth(2).unwrap_or("")
    }
}

/// The stack of a block module path (`layers.3.attention.to_q` → "layers"), None outside blocks.
pub fn stack_of(path: &str) -> Option<&'static str> {
    let mut parts = path.split('.');
    let (stack, index) = (parts.next()?, parts.next()?);
    index.parse::<usize>().ok()?;
    STACKS.iter().copied().find(|s| *s == stack)
}

/// An adapter on one Linear (of the trained LoRA, LoKr or LoHa, or of the frozen training
/// adapter).
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub path: String,
    pub out: usize,
    pub inp: usize,
    /// Parameters of this module's factors.
    pub params: u64,
    /// Each factor tensor's (rows, cols): what the optimizers keep state for.
    pub tensors: Vec<(usize, usize)>,
    /// Floating-point operations per token of its forward, as nn/adapter.rs computes it:
    /// 2 · params for a LoRA (x·Aᵀ, then ·Bᵀ), 2 · (m·n·k + l·m·k) for a LoKr (the input
    /// viewed as [m, n], times w2ᵀ, then w1 ·), 2 · out · in for a LoHa (its dense delta).
    pub forward_flops: f64,
    /// The same for its backward when it is trained: twice the forward for a LoRA; for a
    /// LoKr or LoHa the dense delta's gradient dyᵀ·x and the input's gradient dy·ΔW, each
    /// 2 · out · in (nn/adapter.rs `dense_factor_grads`).
    pub backward_flops: f64,
}

impl LowRank {
    /// The module on `path`, an [out, in] Linear, made of factors `shapes` of `algorithm`.
    pub fn new(
        path: String,
        (out, inp): (usize, usize),
        algorithm: Algorithm,
        shapes: &[FactorShape],
    ) -> Self {
        let tensors: Vec<(usize, usize)> = shapes
            .iter()
            .flat_map(|s| match *s {
                FactorShape::Full(r, c) => vec![(r, c)],
                FactorShape::Product(r, k, c) => vec![(r, k), (k, c)],
            })
            .collect();
        let params = tensors.iter().map(|(r, c)| (r * c) as u64).sum::<u64>();
        let dense = 2.0 * (out * inp) as f64;
        let (forward_flops, backward_flops) = match (algorithm, shapes) {
            (Algorithm::Lora, _) => (2.0 * params as f64, 4.0 * params as f64),
            (Algorithm::Lokr, [w1, w2]) => {
                let ((l, m), (k, n)) = (w1.dims(), w2.dims());
                (2.0 * (m * n * k + l * m * k) as f64, 2.0 * dense)
            }
            _ => (dense, 2.0 * dense),
        };
        Self {
            path,
            out,
            inp,
            params,
            tensors,
            forward_flops,
            backward_flops,
        }
    }

    /// A file's adapter: its algorithm and factor shapes.
    fn of_file(path: String, weights: &AdapterWeights) -> Result<Self> {
        let shape = |f: &Factor| -> Result<FactorShape> {
            let (rows, cols) = f.dims()?;
            Ok(match f.rank() {
                Some(k) => FactorShape::Product(rows, k, cols),
                None => FactorShape::Full(rows, cols),
            })
        };
        let (algorithm, shapes) = match weights {
            AdapterWeights::LowRank { down, .. } => {
                let (out, inp) = weights.shape()?;
                let rank = down.dims()[0];
                (Algorithm::Lora, vec![FactorShape::Product(out, rank, inp)])
            }
            AdapterWeights::Kronecker { w1, w2 } => (Algorithm::Lokr, vec![shape(w1)?, shape(w2)?]),
            AdapterWeights::Hadamard { w1, w2 } => (Algorithm::Loha, vec![shape(w1)?, shape(w2)?]),
        };
        Ok(Self::new(path, weights.shape()?, algorithm, &shapes))
    }

    /// The rank a LoRA of the same size would have (exact for LoRA).
    pub fn rank(&self) -> f64 {
        self.params as f64 / (self.out + self.inp) as f64
    }

    pub fn stack(&self) -> Option<&'static str> {
        stack_of(&self.path)
    }

    pub fn module(&self) -> &str {
        self.path.splitn(3, '.').nth(2).unwrap_or("")
    }
}

/// Where the dimensions came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A model folder (or HF-cache snapshot) on this machine, with its weight bytes.
    Local { root: PathBuf, bytes: u64 },
    /// The released Z-Image's, built in.
    BuiltIn,
}

#[derive(Debug, Clone)]
pub struct ModelDims {
    pub source: Source,
    pub transformer: TransformerConfig,
    /// Every 2-D weight of the transformer.
    pub linears: Vec<Linear>,
    pub transformer_params: u64,
    /// Bytes of the transformer's weight files.
    pub transformer_file_bytes: u64,
    pub text: TextEncoderConfig,
    /// Parameters the text encoder loads (all layers but the last, and not the final norm:
    /// Z-Image reads the second-to-last hidden state).
    pub text_params: u64,
    pub text_file_bytes: u64,
    pub vae: VaeConfig,
    pub vae_params: u64,
    pub vae_file_bytes: u64,
}

/// Bytes of the weight files of the transformer, text encoder and VAE.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FileBytes {
    transformer: u64,
    text: u64,
    vae: u64,
}

impl ModelDims {
    /// The configuration's model: its folder when `[model] path` names one on this machine (a
    /// folder, or a repo id in the local Hugging Face cache); the built-in dimensions of the
    /// configured variant otherwise.
    pub fn for_config(cfg: &TrainConfig) -> Result<Self> {
        match ModelFolder::open(&cfg.model.path) {
            Ok(folder) => Self::local(&folder),
            Err(e) if Path::new(&cfg.model.path).exists() => Err(e),
            Err(_) => Self::built_in(cfg.model.variant),
        }
    }

    pub fn built_in(variant: Variant) -> Result<Self> {
        // variant_parts lists the transformer, text encoder and VAE first, in that order.
        let parts = known::variant_parts(variant);
        let bytes = |i: usize| parts.get(i).map_or(0, |p| p.bytes);
        Self::assemble(
            Source::BuiltIn,
            TransformerConfig::z_image(),
            TextEncoderConfig::qwen3_4b(),
            VaeConfig::z_image(),
            FileBytes {
                transformer: bytes(0),
                text: bytes(1),
                vae: bytes(2),
            },
        )
    }

    /// A random-weight model's dimensions (`model::tiny`) without writing it: file sizes are
    /// its parameters at `bytes_per_weight`, as `tiny::create` saves them.
    #[cfg(test)]
    pub(crate) fn of_tiny(spec: &crate::model::tiny::TinySpec) -> Result<Self> {
        let (transformer, text, vae) = spec.configs()?;
        let bytes = spec.dtype.size_in_bytes() as u64;
        let mut dims = Self::assemble(
            Source::BuiltIn,
            transformer,
            text,
            vae,
            FileBytes {
                transformer: 0,
                text: 0,
                vae: 0,
            },
        )?;
        dims.transformer_file_bytes = dims.transformer_params * bytes;
        dims.text_file_bytes = dims.text_params * bytes;
        dims.vae_file_bytes = dims.vae_params * bytes;
        Ok(dims)
    }

    fn local(folder: &ModelFolder) -> Result<Self> {
        let root = folder.root();
        let size = |c: &str| files_bytes(&component_files(&root.join(c))?);
        let files = FileBytes {
            transformer: size("transformer")?,
            text: size("text_encoder")?,
            vae: size("vae")?,
        };
        Self::assemble(
            Source::Local {
                root: root.to_path_buf(),
                bytes: files.transformer + files.text + files.vae,
            },
            folder.transformer_config()?,
            TextEncoderConfig::from_file(&root.join("text_encoder/config.json"))?,
            VaeConfig::from_file(&root.join("vae/config.json"))?,
            files,
        )
    }

    fn assemble(
        source: Source,
        transformer: TransformerConfig,
        text: TextEncoderConfig,
        vae: VaeConfig,
        files: FileBytes,
    ) -> Result<Self> {
        let tensors = expected_tensors(&transformer)?;
        let linears = tensors
            .iter()
            .filter_map(
                |(name, shape)| match (name.strip_suffix(".weight"), &shape[..]) {
                    (Some(path), &[out, inp]) => Some(Linear {
                        path: path.to_string(),
                        out,
                        inp,
                    }),
                    _ => None,
                },
            )
            .collect();
        let text_params = count(&recorded_tensors(|vb| {
            Qwen3TextEncoder::new(&text, vb).map(|_| ())
        })?);
        let vae_params = count(&recorded_tensors(|vb| {
            AutoencoderKL::new(&vae, vb).map(|_| ())
        })?);
        Ok(Self {
            source,
            transformer_params: count(&tensors),
            transformer,
            linears,
            transformer_file_bytes: files.transformer,
            text,
            text_params,
            text_file_bytes: files.text,
            vae,
            vae_params,
            vae_file_bytes: files.vae,
        })
    }

    /// Pixels per latent side: the VAE's factor (8 for Z-Image, 4 for the tiny model).
    pub fn vae_factor(&self) -> usize {
        self.vae.spatial_factor()
    }

    /// The trained adapter's modules, with the factor shapes training gives them.
    pub fn lora(&self, cfg: &LoraConfig) -> Vec<LowRank> {
        self.linears
            .iter()
            .filter(|l| cfg.targets(&l.path))
            .map(|l| {
                let shapes = cfg.factor_shapes(l.out, l.inp);
                LowRank::new(l.path.clone(), (l.out, l.inp), cfg.algorithm, &shapes)
            })
            .collect()
    }

    /// The training adapter's modules: read from the file when it exists; ostris's v2
    /// otherwise, whose 340,194,488 bytes are exactly a rank-64 bf16 LoRA on every Linear of
    /// the main layers including adaLN (inferred from the size; see docs/plan.md).
    pub fn adapter(&self, path: &Path) -> Result<Vec<LowRank>> {
        if path.exists() {
            let file = LoraFile::read_for_dim(path, self.transformer.dim)?;
            return file
                .modules
                .iter()
                .map(|(p, m)| LowRank::of_file(p.clone(), &m.weights))
                .collect();
        }
        const V2_RANK: usize = 64;
        Ok(self
            .linears
            .iter()
            .filter(|l| l.stack() == Some("layers"))
            .map(|l| {
                let shape = [FactorShape::Product(l.out, V2_RANK, l.inp)];
                LowRank::new(l.path.clone(), (l.out, l.inp), Algorithm::Lora, &shape)
            })
            .collect())
    }
}

fn count(tensors: &std::collections::BTreeMap<String, Vec<usize>>) -> u64 {
    tensors
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum()
}

fn files_bytes(files: &[PathBuf]) -> Result<u64> {
    files.iter().try_fold(0, |sum, f| {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        Ok(sum + meta.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_counts_match_the_released_checkpoints() {
        let dims = ModelDims::built_in(Variant::Turbo).unwrap();
        assert_eq!(dims.transformer_params, known::TRANSFORMER_PARAMS);
        assert_eq!(dims.transformer_file_bytes, known::TRANSFORMER_PARAMS * 4);
        // Z-Image loads 35 of Qwen3-4B's 36 layers and not the final norm.
        let (per_layer, final_norm) = (100_930_816, 2560);
        assert_eq!(
            dims.text_params,
            known::TEXT_ENCODER_PARAMS - per_layer - final_norm
        );
        let v2 = dims.adapter(Path::new("/nonexistent")).unwrap();
        let bytes: u64 = v2.iter().map(|m| m.params * 2).sum();
        // The file's 340,194,488 bytes are these tensors plus a JSON header.
        assert!(340_194_488 - bytes < 200_000, "{bytes}");
    }

    #[test]
    fn the_default_lora_has_seven_modules_per_main_layer() {
        let dims = ModelDims::built_in(Variant::Base).unwrap();
        let cfg: LoraConfig = toml::from_str("rank = 16\nalpha = 16").unwrap();
        let lora = dims.lora(&cfg);
        assert_eq!(lora.len(), 30 * 7);
        let params: u64 = lora.iter().map(|m| m.params).sum();
        // q, k, v, out: 16·(3840+3840); w1, w3: 16·(3840+10240); w2 the same.
        assert_eq!(params, 30 * (4 * 16 * 7680 + 3 * 16 * 14080));
    }

    /// LyCORIS' shapes (lora-formats.md §4): a rank-16 LoKr on q, k, v, out has w1 [60, 60]
    /// and w2 [64, 16]·[16, 64]; on w1, w3 w1 [80, 60] and w2 [128, 16]·[16, 64]; on w2 the
    /// transposes. A rank-8 LoHa holds two rank-8 products: a rank-16 LoRA's count.
    #[test]
    fn lokr_and_loha_counts_follow_their_factor_shapes() {
        let dims = ModelDims::built_in(Variant::Base).unwrap();
        let count = |lora: &str| -> (u64, usize) {
            let cfg: LoraConfig = toml::from_str(&format!("alpha = 1\n{lora}")).unwrap();
            let modules = dims.lora(&cfg);
            let tensors = modules.iter().map(|m| m.tensors.len()).sum();
            (modules.iter().map(|m| m.params).sum(), tensors)
        };
        let attention = 60 * 60 + 16 * (64 + 64);
        let ffn = 80 * 60 + 16 * (128 + 64);
        assert_eq!(
            count("rank = 16\nalgorithm = \"lokr\""),
            (30 * (4 * attention + 3 * ffn), 30 * 7 * 3)
        );
        assert_eq!(
            count("rank = 8\nalgorithm = \"loha\"").0,
            30 * (4 * 16 * 7680 + 3 * 16 * 14080)
        );
        let full = 60 * 60 + 64 * 64;
        assert_eq!(
            count("rank = 16\nalgorithm = \"lokr\"\nfull_matrix = true"),
            (30 * (4 * full + 3 * (80 * 60 + 128 * 64)), 30 * 7 * 2)
        );
    }
}
