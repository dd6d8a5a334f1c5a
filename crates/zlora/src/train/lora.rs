//! The adapter being trained: a LoRA, LoKr or LoHa per targeted Linear, its factors f32
//! `Var`s, attached to the model as an ordinary adapter so the same forward serves training
//! and sampling. Shapes, initialisation and scale follow LyCORIS (`lycoris/modules/lokr.py`,
//! `loha.py`, lycoris-lora 4.1.3) so that a file written here means in every loader what it
//! meant in training.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::lora::LoraModule;
use crate::model::dit::{BLOCK_LINEARS, STACKS};
use crate::nn::{Adapter, AdapterWeights, Factor, LinearTargets};
use crate::{Error, Result};

/// The adapter name the trained LoRA carries on every Linear.
pub const TRAINED: &str = "trained";

/// What is trained on each Linear.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// up · down, rank r.
    #[default]
    Lora,
    /// LyCORIS LoKr: kron(w1, w2), each factor full or a rank-r product.
    Lokr,
    /// LyCORIS LoHa: (w1a·w1b) ⊙ (w2a·w2b), each of rank r.
    Loha,
}

impl Algorithm {
    fn is_lora(&self) -> bool {
        *self == Algorithm::Lora
    }

    /// "LoRA", "LoKr" or "LoHa", as [`AdapterWeights::kind`] names them.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lora => "LoRA",
            Algorithm::Lokr => "LoKr",
            Algorithm::Loha => "LoHa",
        }
    }
}

/// Which Linears get a trainable adapter: `{stack}.{i}.{module}` for every listed stack and
/// module; and which adapter.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// "lora" (default), "lokr" or "loha". Left out of a LoRA's saved config, which then
    /// reads as before, so checkpoints of earlier versions still resume.
    #[serde(default, skip_serializing_if = "Algorithm::is_lora")]
    pub algorithm: Algorithm,
    /// LoKr: the split of each dimension into (smaller, larger) factors, LyCORIS'
    /// `factorization`: -1 (default) the most balanced pair, f > 0 the pair closest to f.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<i64>,
    /// LoKr: w1 a rank-r product too (when r is below half its larger side), not only w2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decompose_both: Option<bool>,
    /// LoKr: both factors full matrices (no rank; scale 1 whatever alpha).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_matrix: Option<bool>,
    /// DoRA (weight decomposition), accepted only to be refused with the reason.
    #[serde(default, alias = "use_dora", skip_serializing)]
    pub dora: bool,
    /// Block stacks: "layers" (default), "noise_refiner", "context_refiner".
    #[serde(default = "default_stacks")]
    pub stacks: Vec<String>,
    /// Module paths inside a block; add "adaLN_modulation.0" to train the modulation.
    #[serde(default = "default_modules")]
    pub modules: Vec<String>,
}

/// The shape of one factor of a new adapter: a full [rows, cols] matrix, or a product
/// [rows, rank]·[rank, cols].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorShape {
    Full(usize, usize),
    Product(usize, usize, usize),
}

impl FactorShape {
    /// (rows, cols) of the matrix it stands for.
    pub fn dims(self) -> (usize, usize) {
        match self {
            FactorShape::Full(r, c) | FactorShape::Product(r, _, c) => (r, c),
        }
    }

    pub fn params(self) -> usize {
        match self {
            FactorShape::Full(r, c) => r * c,
            FactorShape::Product(r, k, c) => k * (r + c),
        }
    }
}

/// LyCORIS' `factorization`: `dimension` = m·n with m ≤ n; for `factor` > 0 dividing it,
/// (factor, dimension / factor) ordered; otherwise the most balanced pair whose smaller
/// side does not exceed `factor` (any, for -1).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    let ordered = |a: usize, b: usize| (a.min(b), a.max(b));
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let f = factor as usize;
        return ordered(f, dimension / f);
    }
    let limit = if factor < 0 {
        dimension
    } else {
        factor as usize
    };
    let (mut m, mut n) = (1, dimension);
    while m < n {
        let mut next = m + 1;
        while !dimension.is_multiple_of(next) {
            next += 1;
        }
        let other = dimension / next;
        if next + other > m + n || next > limit {
            break;
        }
        (m, n) = (next, other);
    }
    ordered(m, n)
}

fn default_stacks() -> Vec<String> {
    vec!["layers".into()]
}

/// ai-toolkit's and musubi's common core: attention q/k/v/out and the SwiGLU FFN (every block
/// Linear but the adaLN modulation).
fn default_modules() -> Vec<String> {
    BLOCK_LINEARS
        .iter()
        .filter(|m| !m.starts_with("adaLN"))
        .map(|m| m.to_string())
        .collect()
}

impl LoraConfig {
    /// Rejects unknown stack or module names (a typo must not silently train nothing), DoRA,
    /// and LoKr options given to another algorithm.
    pub fn validate(&self) -> Result<()> {
        if self.dora {
            return Err(Error::Invalid(
                "[lora] dora: DoRA is not supported: it breaks training on Z-Image (ai-toolkit \
                 #596); remove it, or use algorithm = \"lora\", \"lokr\" or \"loha\""
                    .into(),
            ));
        }
        let lokr_options = [
            ("factor", self.factor.is_some()),
            ("decompose_both", self.decompose_both.is_some()),
            ("full_matrix", self.full_matrix.is_some()),
        ];
        if let Some((name, _)) = lokr_options
            .iter()
            .find(|(_, set)| *set && self.algorithm != Algorithm::Lokr)
        {
            return Err(Error::Invalid(format!(
                "[lora] {name} is a LoKr option; set algorithm = \"lokr\" or remove it"
            )));
        }
        if matches!(self.factor, Some(f) if f == 0 || f < -1) {
            return Err(Error::Invalid(format!(
                "[lora] factor must be -1 (the most balanced split) or a positive integer, got {}",
                self.factor.unwrap_or_default()
            )));
        }
        if self.rank == 0 {
            return Err(Error::Invalid("[lora] rank must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::Invalid(format!(
                "[lora] alpha must be a positive finite number (the LoRA's scale is alpha / rank), \
                 got {}",
                self.alpha
            )));
        }
        for s in &self.stacks {
            if !STACKS.contains(&s.as_str()) {
                return Err(Error::Invalid(format!(
                    "[lora] unknown stack {s:?}; known: {STACKS:?}"
                )));
            }
        }
        for m in &self.modules {
            if !BLOCK_LINEARS.contains(&m.as_str()) {
                return Err(Error::Invalid(format!(
                    "[lora] unknown module {m:?}; known: {BLOCK_LINEARS:?}"
                )));
            }
        }
        Ok(())
    }

    /// The rank must not exceed min(out, in) of any targeted Linear, given as
    /// (path, (out, in)): a LoRA or LoHa product cannot have more rank than the Linear it
    /// adapts. (A LoKr whose rank is too large for a factor makes it full, as LyCORIS does.)
    pub fn check_rank<'a>(
        &self,
        linears: impl IntoIterator<Item = (&'a str, (usize, usize))>,
    ) -> Result<()> {
        if self.algorithm == Algorithm::Lokr {
            return Ok(());
        }
        for (path, (out, inp)) in linears {
            if self.targets(path) && self.rank > out.min(inp) {
                return Err(Error::Invalid(format!(
                    "[lora] rank {} is above min(out, in) = {} of {path}: a LoRA cannot have \
                     more rank than the Linear it adapts",
                    self.rank,
                    out.min(inp)
                )));
            }
        }
        Ok(())
    }

    /// The factor shapes of the adapter on an [out, in] Linear: a LoRA is one product
    /// up·down, a LoHa two products of [out, in], a LoKr w1 [l, m] and w2 [k, n] with
    /// (l, k) and (m, n) LyCORIS' factorizations of out and in, w1 a product only with
    /// `decompose_both` and r < max(l, m)/2, w2 a product when r < max(k, n)/2, neither with
    /// `full_matrix`.
    pub fn factor_shapes(&self, out: usize, inp: usize) -> Vec<FactorShape> {
        let r = self.rank;
        match self.algorithm {
            Algorithm::Lora => vec![FactorShape::Product(out, r, inp)],
            Algorithm::Loha => vec![FactorShape::Product(out, r, inp); 2],
            Algorithm::Lokr => {
                let factor = self.factor.unwrap_or(-1);
                let ((l, k), (m, n)) = (factorization(out, factor), factorization(inp, factor));
                let full = self.full_matrix.unwrap_or(false);
                let shape = |rows: usize, cols: usize, decompose: bool| {
                    if decompose && !full && 2 * r < rows.max(cols) {
                        FactorShape::Product(rows, r, cols)
                    } else {
                        FactorShape::Full(rows, cols)
                    }
                };
                vec![
                    shape(l, m, self.decompose_both.unwrap_or(false)),
                    shape(k, n, true),
                ]
            }
        }
    }

    /// New factors for an [out, in] Linear, one of them zero so that training starts from the
    /// base model exactly: LoRA down kaiming-uniform, up 0 (PEFT); LoKr w1 (or both its halves)
    /// kaiming-uniform, w2 0 (or w2_a kaiming-uniform, w2_b 0); LoHa w1_a ~ N(0, 0.1),
    /// w1_b and w2_b ~ N(0, 1), w2_a 0 (LyCORIS).
    pub fn new_weights(
        &self,
        (out, inp): (usize, usize),
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<AdapterWeights> {
        use Init::*;
        let shapes = self.factor_shapes(out, inp);
        Ok(match self.algorithm {
            Algorithm::Lora => {
                let down = draw((self.rank, inp), KaimingUniform, rng, device)?;
                let up = draw((out, self.rank), Zeros, rng, device)?;
                AdapterWeights::LowRank { down, up }
            }
            Algorithm::Lokr => AdapterWeights::Kronecker {
                w1: new_factor(shapes[0], [KaimingUniform; 3], rng, device)?,
                w2: new_factor(shapes[1], [Zeros, KaimingUniform, Zeros], rng, device)?,
            },
            Algorithm::Loha => AdapterWeights::Hadamard {
                w1: new_factor(shapes[0], [Zeros, Normal(0.1), Normal(1.0)], rng, device)?,
                w2: new_factor(shapes[1], [Zeros, Zeros, Normal(1.0)], rng, device)?,
            },
        })
    }

    pub(crate) fn targets(&self, path: &str) -> bool {
        let mut parts = path.splitn(3, '.');
        let (Some(stack), Some(index), Some(module)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        index.parse::<usize>().is_ok()
            && self.stacks.iter().any(|s| s == stack)
            && self.modules.iter().any(|m| m == module)
    }
}

/// One trainable adapter: its factors (every tensor a `Var`) and scale.
#[derive(Debug, Clone)]
pub struct TrainableModule {
    pub path: String,
    pub weights: AdapterWeights,
    /// alpha / rank, or 1 for a LoKr whose factors are both full (LyCORIS).
    pub scale: f64,
    vars: Vec<Var>,
}

impl TrainableModule {
    /// The module on `path` with these factors (made `Var`s) and LyCORIS' scale for `alpha`.
    pub fn new(path: String, weights: AdapterWeights, alpha: f64) -> Result<Self> {
        let scale = weights.alpha_rank().map_or(1.0, |r| alpha / r as f64);
        let weights = weights.map(|t| Ok(Var::from_tensor(t)?.as_tensor().clone()))?;
        // Each tensor is a variable now, so these share its id and storage.
        let vars = weights
            .tensors()
            .into_iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            path,
            weights,
            scale,
            vars,
        })
    }

    /// The factors as `Var`s, in the order of [`AdapterWeights::tensors`].
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The factors' names in `vars` order: down, up for a LoRA (the names older checkpoints
    /// use), LyCORIS' tensor names for LoKr and LoHa.
    pub fn var_names(&self) -> Vec<String> {
        let factor = |f: &Factor, w: &str, full: &str| match f {
            Factor::Full(_) => vec![full.to_string()],
            Factor::Product(..) => vec![format!("{w}_a"), format!("{w}_b")],
        };
        let names = match &self.weights {
            AdapterWeights::LowRank { .. } => vec!["down".to_string(), "up".to_string()],
            AdapterWeights::Kronecker { w1, w2 } => [
                factor(w1, "lokr_w1", "lokr_w1"),
                factor(w2, "lokr_w2", "lokr_w2"),
            ]
            .concat(),
            AdapterWeights::Hadamard { w1, w2 } => {
                [factor(w1, "hada_w1", ""), factor(w2, "hada_w2", "")].concat()
            }
        };
        names
            .into_iter()
            .map(|n| format!("{}.{n}", self.path))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct TrainableLora {
    pub algorithm: Algorithm,
    pub modules: Vec<TrainableModule>,
}

/// How LyCORIS starts a factor.
#[derive(Clone, Copy)]
enum Init {
    /// PyTorch's kaiming-uniform with a = √5: U(−1/√cols, 1/√cols).
    KaimingUniform,
    Normal(f32),
    Zeros,
}

/// A [rows, cols] f32 tensor on `device`, drawn from `rng` as `init` says.
fn draw(
    (rows, cols): (usize, usize),
    init: Init,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Tensor> {
    let n = rows * cols;
    let values: Vec<f32> = match init {
        Init::KaimingUniform => {
            let bound = 1.0 / (cols as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        }
        Init::Normal(std) => (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut *rng);
                std * z
            })
            .collect(),
        Init::Zeros => return Ok(Tensor::zeros((rows, cols), DType::F32, device)?),
    };
    Ok(Tensor::from_vec(values, (rows, cols), device)?)
}

/// A factor of `shape`, its full matrix or its halves (a, b) started as `init` says.
fn new_factor(
    shape: FactorShape,
    [full, a, b]: [Init; 3],
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Factor> {
    Ok(match shape {
        FactorShape::Full(rows, cols) => Factor::Full(draw((rows, cols), full, rng, device)?),
        FactorShape::Product(rows, rank, cols) => Factor::Product(
            draw((rows, rank), a, rng, device)?,
            draw((rank, cols), b, rng, device)?,
        ),
    })
}

impl TrainableLora {
    /// New factors for every targeted Linear (see [`LoraConfig::new_weights`]), so training starts from
    /// the base model exactly.
    pub fn new(cfg: &LoraConfig, model: &impl LinearTargets, rng: &mut ChaCha8Rng) -> Result<Self> {
        cfg.validate()?;
        // The model's device; f32 whatever its compute dtype (master weights).
        let (device, _) = model.placement();
        let shapes = model.linear_shapes();
        cfg.check_rank(shapes.iter().map(|(p, s)| (p.as_str(), *s)))?;
        let mut modules = Vec::new();
        for (path, shape) in shapes {
            if cfg.targets(&path) {
                let weights = cfg.new_weights(shape, rng, &device)?;
                modules.push(TrainableModule::new(path, weights, cfg.alpha)?);
            }
        }
        if modules.is_empty() {
            return Err(Error::Invalid(
                "[lora] the stacks and modules select no Linear of this model".into(),
            ));
        }
        Ok(Self {
            algorithm: cfg.algorithm,
            modules,
        })
    }

    /// Every trainable tensor in a fixed order (per module, its factors' tensors).
    pub fn vars(&self) -> Vec<&Var> {
        self.modules.iter().flat_map(|m| m.vars()).collect()
    }

    /// Names for checkpoint files, aligned with `vars()`.
    pub fn var_names(&self) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(TrainableModule::var_names)
            .collect()
    }

    /// Pushes the adapters onto the model's Linears under the name `TRAINED`.
    pub fn attach(&self, model: &mut impl LinearTargets) -> Result<()> {
        for m in &self.modules {
            let linear = model
                .linear_mut(&m.path)
                .ok_or_else(|| Error::Invalid(format!("model has no Linear {}", m.path)))?;
            linear
                .push_adapter(Adapter {
                    name: TRAINED.into(),
                    weights: m.weights.clone(),
                    scale: m.scale,
                    strength: 1.0,
                    enabled: true,
                })
                .map_err(|e| Error::Invalid(format!("{}: {e}", m.path)))?;
        }
        Ok(())
    }

    /// The canonical modules (diffusers path → factors, scale) for writing a LoRA file.
    pub fn to_modules(&self) -> Result<BTreeMap<String, LoraModule>> {
        self.modules
            .iter()
            .map(|m| {
                let module = LoraModule {
                    weights: m.weights.copied()?,
                    scale: m.scale,
                    source_key: m.path.clone(),
                };
                Ok((m.path.clone(), module))
            })
            .collect()
    }

    /// Overwrites the values from named tensors (a checkpoint), checking names and shapes.
    pub fn load_values(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.var_names().iter().zip(self.vars()) {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("checkpoint lacks LoRA tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(Error::Invalid(format!(
                    "checkpoint tensor {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// The values by name (for checkpoints).
    pub fn values(&self) -> BTreeMap<String, Tensor> {
        self.var_names()
            .into_iter()
            .zip(self.vars())
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }
}

/// Switches every adapter with this name on or off (e.g. the training adapter for samples).
pub fn set_enabled(model: &mut impl LinearTargets, name: &str, enabled: bool) {
    for_each_stack(model, |stack| {
        for a in stack.iter_mut().filter(|a| a.name == name) {
            a.enabled = enabled;
        }
    });
}

/// Removes every adapter with this name (e.g. one checkpoint's LoRA before the next one's).
pub fn detach(model: &mut impl LinearTargets, name: &str) {
    for_each_stack(model, |stack| stack.retain(|a| a.name != name));
}

/// Calls `f` on the adapter stack of every Linear of `model`.
fn for_each_stack(model: &mut impl LinearTargets, mut f: impl FnMut(&mut Vec<Adapter>)) {
    let paths: Vec<String> = model.linear_shapes().into_iter().map(|(p, _)| p).collect();
    for p in paths {
        if let Some(l) = model.linear_mut(&p) {
            f(l.adapters_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_stack_index_and_module() {
        let cfg: LoraConfig = toml::from_str("rank = 4\nalpha = 4").unwrap();
        assert!(cfg.targets("layers.3.attention.to_q"));
        assert!(cfg.targets("layers.0.attention.to_out.0"));
        assert!(!cfg.targets("noise_refiner.0.attention.to_q"));
        assert!(!cfg.targets("layers.3.adaLN_modulation.0"));
        assert!(!cfg.targets("t_embedder.mlp.0"));
    }

    /// What lycoris-lora 4.1.3's `factorization` returns for these (run in /work/venv; its
    /// docstring's 360 rows are out of date), the Z-Image widths among them.
    #[test]
    fn factorization_follows_lycoris() {
        let cases = [
            ((127, -1), (1, 127)),
            ((128, -1), (8, 16)),
            ((128, 2), (2, 64)),
            ((250, 8), (5, 50)),
            ((360, -1), (18, 20)),
            ((360, 16), (15, 24)),
            ((3840, 16), (16, 240)),
            ((1024, 4), (4, 256)),
            ((3840, -1), (60, 64)),
            ((10240, -1), (80, 128)),
            ((15360, -1), (120, 128)),
            ((256, -1), (16, 16)),
            ((11520, -1), (96, 120)),
        ];
        for ((dim, factor), want) in cases {
            assert_eq!(
                factorization(dim, factor),
                want,
                "{dim} with factor {factor}"
            );
        }
    }

    /// Z-Image's to_q (3840 × 3840): w1 [60, 60] full, w2 [64, 64] a product below rank 32,
    /// full from 32 on, both products with decompose_both, both full with full_matrix.
    #[test]
    fn lokr_factor_shapes_follow_lycoris() {
        let shapes = |extra: &str| {
            let cfg: LoraConfig =
                toml::from_str(&format!("alpha = 1\nalgorithm = \"lokr\"\n{extra}")).unwrap();
            cfg.factor_shapes(3840, 3840)
        };
        use FactorShape::*;
        assert_eq!(shapes("rank = 16"), [Full(60, 60), Product(64, 16, 64)]);
        assert_eq!(shapes("rank = 32"), [Full(60, 60), Full(64, 64)]);
        assert_eq!(
            shapes("rank = 16\ndecompose_both = true"),
            [Product(60, 16, 60), Product(64, 16, 64)]
        );
        assert_eq!(
            shapes("rank = 16\nfull_matrix = true"),
            [Full(60, 60), Full(64, 64)]
        );
        assert_eq!(
            shapes("rank = 4\nfactor = 16"),
            [Full(16, 16), Product(240, 4, 240)]
        );
    }

    #[test]
    fn bad_algorithm_options_are_one_line_errors_naming_the_field() {
        let err = |text: &str| {
            let cfg: LoraConfig = toml::from_str(&format!("rank = 4\nalpha = 4\n{text}")).unwrap();
            cfg.validate().unwrap_err().to_string()
        };
        for (text, field) in [
            ("dora = true", "dora"),
            ("use_dora = true", "dora"),
            ("factor = 4", "factor"),
            (
                "algorithm = \"loha\"\ndecompose_both = true",
                "decompose_both",
            ),
            ("full_matrix = false", "full_matrix"),
            ("algorithm = \"lokr\"\nfactor = 0", "factor"),
            ("algorithm = \"lokr\"\nfactor = -2", "factor"),
        ] {
            let e = err(text);
            assert!(e.contains(field) && !e.contains('\n'), "{text}: {e}");
        }
        assert!(err("dora = true").contains("ai-toolkit #596"));
        let unknown = toml::from_str::<LoraConfig>("rank = 4\nalpha = 4\nalgorithm = \"lycoris\"");
        let e = unknown.unwrap_err().to_string();
        assert!(e.contains("algorithm") && e.contains("lokr"), "{e}");
    }

    /// A LoRA's saved config reads as one from before `algorithm` existed (so `--resume`
    /// finds no change in checkpoints of earlier versions); a LoKr's keeps its options.
    #[test]
    fn saved_configs_round_trip() {
        let lora: LoraConfig = toml::from_str("rank = 4\nalpha = 4").unwrap();
        let text = toml::to_string(&lora).unwrap();
        assert!(
            ["algorithm", "factor", "dora"]
                .iter()
                .all(|k| !text.contains(k)),
            "{text}"
        );
        let lokr: LoraConfig = toml::from_str(
            "rank = 4\nalpha = 4\nalgorithm = \"lokr\"\nfactor = 8\ndecompose_both = true",
        )
        .unwrap();
        let back: LoraConfig = toml::from_str(&toml::to_string(&lokr).unwrap()).unwrap();
        assert_eq!(back, lokr);
    }

    #[test]
    fn unknown_names_are_rejected() {
        let mut cfg: LoraConfig = toml::from_str("rank = 4\nalpha = 4").unwrap();
        cfg.modules.push("attention.to_qq".into());
        assert!(cfg.validate().unwrap_err().to_string().contains("to_qq"));
    }
}
