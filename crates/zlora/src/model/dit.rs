//! The S3-DiT transformer of Z-Image, written after diffusers' `transformer_z_image.py`
//! (reference §2). Stages, in order: timestep embedding → patchify + x_embedder → noise
//! refiner → cap_embedder → context refiner → unified [image, caption] sequence → main
//! layers → final layer → unpatchify. Parameter paths equal the diffusers checkpoint names.

mod backward;
mod swap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use backward::{AttentionTape, FeedForwardTape, Modulation};
pub use backward::{BlockTape, Grad};
pub use swap::{BlockStack, Transfers};

use super::config::{TransformerConfig, SEQ_MULTI_OF, T_EMBED_MID, T_FREQ_DIM};
use super::rope::{Position, RopeEmbedder, Rotation};

use crate::nn::attention::{attention, key_padding_mask};
use crate::nn::norm::layer_norm_no_affine;
use crate::nn::swiglu::swiglu;
use crate::nn::{Linear, LinearTargets, Quantization, RmsNorm};

/// A dense Linear (blocks get their stored weight, maybe quantized, after the model is built).
fn linear(vb: &VarBuilder, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    Linear::load((inp, out), bias, None, vb)
}

/// The block stacks, in the order they run; a block is `<stack>.<index>`.
pub const STACKS: [&str; 3] = ["noise_refiner", "context_refiner", "layers"];

/// The Linears inside a block, by diffusers path (the context refiner has no adaLN).
pub const BLOCK_LINEARS: [&str; 8] = [
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
];

fn round_up(n: usize) -> usize {
    n.div_ceil(SEQ_MULTI_OF) * SEQ_MULTI_OF
}

/// Sinusoidal features of t·t_scale followed by a two-layer MLP (→ the adaLN input c).
#[derive(Debug, Clone)]
struct TimestepEmbedder {
    mlp0: Linear,
    mlp2: Linear,
}

impl TimestepEmbedder {
    fn new(vb: VarBuilder, out: usize) -> Result<Self> {
        let vb = vb.pp("mlp");
        Ok(Self {
            mlp0: linear(&vb.pp("0"), T_EMBED_MID, T_FREQ_DIM, true)?,
            mlp2: linear(&vb.pp("2"), out, T_EMBED_MID, true)?,
        })
    }

    /// `t` holds already-scaled timesteps (t · t_scale), f32, shape (B,).
    fn forward(&self, t: &Tensor, dtype: DType, grad: Grad) -> Result<Tensor> {
        let half = T_FREQ_DIM / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|j| (-(10000f32.ln()) * j as f32 / half as f32).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let args = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?.to_dtype(dtype)?;
        grad.linear(&self.mlp2, &grad.linear(&self.mlp0, &emb)?.silu()?)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            w1: linear(&vb.pp("w1"), hidden, dim, false)?,
            w2: linear(&vb.pp("w2"), dim, hidden, false)?,
            w3: linear(&vb.pp("w3"), hidden, dim, false)?,
        })
    }

    /// w2(SiLU(w1·x) ⊙ w3·x), with what the backward pass needs.
    fn forward(&self, x: &Tensor, grad: Grad) -> Result<(Tensor, FeedForwardTape)> {
        let u = grad.linear(&self.w1, x)?;
        let g = grad.linear(&self.w3, x)?;
        let z = swiglu(&u, &g)?;
        let out = grad.linear(&self.w2, &z)?;
        let tape = FeedForwardTape {
            x: x.clone(),
            u,
            g,
            z,
        };
        Ok((out, tape))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    n_heads: usize,
}

/// The qk-norm epsilon is fixed in the reference, independent of `norm_eps`.
const QK_NORM_EPS: f64 = 1e-5;

impl Attention {
    fn new(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.dim;
        let qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
            if cfg.qk_norm {
                Ok(Some(RmsNorm::load(
                    vb.pp(name),
                    cfg.head_dim(),
                    QK_NORM_EPS,
                )?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            to_q: linear(&vb.pp("to_q"), dim, dim, false)?,
            to_k: linear(&vb.pp("to_k"), dim, dim, false)?,
            to_v: linear(&vb.pp("to_v"), dim, dim, false)?,
            to_out: linear(&vb.pp("to_out").pp("0"), dim, dim, false)?,
            norm_q: qk_norm("norm_q")?,
            norm_k: qk_norm("norm_k")?,
            n_heads: cfg.n_heads,
        })
    }

    /// A projection split into heads (B, S, H, head_dim), before and after its qk-norm.
    fn heads(
        &self,
        x: &Tensor,
        proj: &Linear,
        norm: &Option<RmsNorm>,
        grad: Grad,
    ) -> Result<(Tensor, Tensor)> {
        let (b, s, dim) = x.dims3()?;
        let h = grad
            .linear(proj, x)?
            .reshape((b, s, self.n_heads, dim / self.n_heads))?;
        let normed = match norm {
            Some(n) => n.forward(&h)?,
            None => h.clone(),
        };
        Ok((h, normed))
    }

    fn forward(
        &self,
        x: &Tensor,
        rot: &Rotation,
        mask: Option<&Tensor>,
        grad: Grad,
    ) -> Result<(Tensor, AttentionTape)> {
        let (b, s, dim) = x.dims3()?;
        let (q_proj, q) = self.heads(x, &self.to_q, &self.norm_q, grad)?;
        let (k_proj, k) = self.heads(x, &self.to_k, &self.norm_k, grad)?;
        let (q, k) = (rot.rotate_heads(&q)?, rot.rotate_heads(&k)?);
        let (_, v) = self.heads(x, &self.to_v, &None, grad)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (out, probs) = attention(&q, &k, &v, mask)?;
        let out = out.transpose(1, 2)?.reshape((b, s, dim))?;
        let y = grad.linear(&self.to_out, &out)?;
        let tape = AttentionTape {
            x: x.clone(),
            q_proj,
            k_proj,
            q,
            k,
            v,
            probs,
            mask: mask.cloned(),
            out,
        };
        Ok((y, tape))
    }
}

/// One block with sandwich norms; modulated (noise refiner, main layers) or not (context
/// refiner). Modulation: scale_msa, gate_msa, scale_mlp, gate_mlp = chunk4(W·c + b), gates
/// through tanh, scales as (1 + scale); no shift term.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    ada_ln_modulation: Option<Linear>,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, cfg: &TransformerConfig, modulated: bool) -> Result<Self> {
        let norm = |name: &str| RmsNorm::load(vb.pp(name), cfg.dim, cfg.norm_eps);
        let ada_ln_modulation = if modulated {
            Some(linear(
                &vb.pp("adaLN_modulation").pp("0"),
                4 * cfg.dim,
                cfg.adaln_dim(),
                true,
            )?)
        } else {
            None
        };
        Ok(Self {
            attention: Attention::new(vb.pp("attention"), cfg)?,
            feed_forward: FeedForward::new(vb.pp("feed_forward"), cfg.dim, cfg.ffn_dim())?,
            attention_norm1: norm("attention_norm1")?,
            attention_norm2: norm("attention_norm2")?,
            ffn_norm1: norm("ffn_norm1")?,
            ffn_norm2: norm("ffn_norm2")?,
            ada_ln_modulation,
        })
    }

    /// x: (B, S, dim); c: the adaLN input (B, adaln_dim), required for modulated blocks. The
    /// forward pass with what [`TransformerBlock::backward`] needs; `Grad::ByHand` builds no
    /// autograd graph.
    pub fn forward_taped(
        &self,
        x: &Tensor,
        rot: &Rotation,
        mask: Option<&Tensor>,
        c: Option<&Tensor>,
        grad: Grad,
    ) -> Result<(Tensor, BlockTape)> {
        let modulation = match (&self.ada_ln_modulation, c) {
            (None, _) => None,
            (Some(ada), Some(c)) => Some(Modulation::new(grad.linear(ada, c)?, c)?),
            (Some(_), None) => candle_core::bail!("modulated block needs c"),
        };
        let m = modulation.as_ref();
        let x_norm = self.attention_norm1.forward(x)?;
        let (a, attention) =
            self.attention
                .forward(&times(&x_norm, m.map(|m| &m.scale_msa))?, rot, mask, grad)?;
        let a_norm = self.attention_norm2.forward(&a)?;
        let x1 = (x + times(&a_norm, m.map(|m| &m.gate_msa))?)?;
        let x1_norm = self.ffn_norm1.forward(&x1)?;
        let (f, feed_forward) = self
            .feed_forward
            .forward(&times(&x1_norm, m.map(|m| &m.scale_mlp))?, grad)?;
        let f_norm = self.ffn_norm2.forward(&f)?;
        let out = (&x1 + times(&f_norm, m.map(|m| &m.gate_mlp))?)?;
        let tape = BlockTape {
            x: x.clone(),
            x_norm,
            attention,
            a,
            a_norm,
            x1,
            x1_norm,
            feed_forward,
            f,
            f_norm,
            modulation,
        };
        Ok((out, tape))
    }

    /// Stores every Linear of the block as `q`: the blocks hold nearly all the weights, and
    /// their Linears' input gradients are hand-written, so they never need candle's autograd
    /// through a quantized kernel.
    fn quantize(&mut self, q: Quantization) -> Result<()> {
        for (name, linear) in self.linears("") {
            linear
                .quantize(q)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", &name[1..])))?;
        }
        Ok(())
    }

    /// Moves the block's frozen Linear weights to `host` memory (block swap).
    fn offload(&mut self, host: &Device) -> Result<()> {
        for (_, linear) in self.linears("") {
            linear.offload(host)?;
        }
        Ok(())
    }

    /// Copies host-held Linear weights to the device; returns the bytes moved.
    fn fetch(&mut self) -> Result<usize> {
        let mut bytes = 0;
        for (_, linear) in self.linears("") {
            bytes += linear.fetch()?;
        }
        Ok(bytes)
    }

    fn linears(&mut self, prefix: &str) -> Vec<(String, &mut Linear)> {
        let mut out = vec![
            (format!("{prefix}.attention.to_q"), &mut self.attention.to_q),
            (format!("{prefix}.attention.to_k"), &mut self.attention.to_k),
            (format!("{prefix}.attention.to_v"), &mut self.attention.to_v),
            (
                format!("{prefix}.attention.to_out.0"),
                &mut self.attention.to_out,
            ),
            (
                format!("{prefix}.feed_forward.w1"),
                &mut self.feed_forward.w1,
            ),
            (
                format!("{prefix}.feed_forward.w2"),
                &mut self.feed_forward.w2,
            ),
            (
                format!("{prefix}.feed_forward.w3"),
                &mut self.feed_forward.w3,
            ),
        ];
        if let Some(ada) = &mut self.ada_ln_modulation {
            out.push((format!("{prefix}.adaLN_modulation.0"), ada));
        }
        out
    }
}

/// y = LayerNorm(x) · (1 + W_ada·SiLU(c)); out = linear(y).
#[derive(Debug, Clone)]
struct FinalLayer {
    linear: Linear,
    ada_ln_modulation: Linear,
}

impl FinalLayer {
    fn new(vb: VarBuilder, cfg: &TransformerConfig) -> Result<Self> {
        Ok(Self {
            linear: linear(&vb.pp("linear"), cfg.patch_dim(), cfg.dim, true)?,
            ada_ln_modulation: linear(
                &vb.pp("adaLN_modulation").pp("1"),
                cfg.dim,
                cfg.adaln_dim(),
                true,
            )?,
        })
    }

    fn forward(&self, x: &Tensor, c: &Tensor, grad: Grad) -> Result<Tensor> {
        let scale = (grad.linear(&self.ada_ln_modulation, &c.silu()?)? + 1.0)?.unsqueeze(1)?;
        let y = layer_norm_no_affine(x, 1e-6)?.broadcast_mul(&scale)?;
        grad.linear(&self.linear, &y)
    }
}

/// A batch of token sequences padded to one length, with their rotations and key mask.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// (B, S, dim) tokens.
    pub x: Tensor,
    pub rot: Rotation,
    /// Key mask when the items' lengths differ (batch padding).
    pub mask: Option<Tensor>,
    /// Each item's valid length.
    pub lens: Vec<usize>,
}

impl Sequence {
    /// Pads each item's (len_i, dim) tokens with zero rows to the longest one.
    pub fn pad(items: Vec<Tensor>, rots: Vec<Rotation>) -> Result<Self> {
        let lens: Vec<usize> = items.iter().map(|t| t.dim(0)).collect::<Result<_>>()?;
        let max = lens.iter().copied().max().unwrap_or(0);
        let pad_rows = |t: &Tensor, n: usize| -> Result<Tensor> {
            let len = t.dim(0)?;
            if len == n {
                return Ok(t.clone());
            }
            let zeros = Tensor::zeros((n - len, t.dim(1)?), t.dtype(), t.device())?;
            Tensor::cat(&[t, &zeros], 0)
        };
        let x: Vec<Tensor> = items
            .iter()
            .map(|t| pad_rows(t, max))
            .collect::<Result<_>>()?;
        let rots: Vec<Rotation> = rots
            .iter()
            .map(|r| {
                Ok(Rotation {
                    cos: pad_rows(&r.cos, max)?,
                    sin: pad_rows(&r.sin, max)?,
                })
            })
            .collect::<Result<_>>()?;
        let device = x[0].device().clone();
        Ok(Self {
            x: Tensor::stack(&x, 0)?,
            rot: Rotation::stack(&rots)?,
            mask: key_padding_mask(&lens, max, &device)?,
            lens,
        })
    }

    /// Item i's valid rows, (len_i, dim).
    pub fn item(&self, i: usize) -> Result<Tensor> {
        self.x.get(i)?.narrow(0, 0, self.lens[i])
    }

    /// Per item: [image tokens, caption tokens], then batch padding.
    pub fn unify(image: &Sequence, caption: &Sequence) -> Result<Sequence> {
        let mut items = Vec::new();
        let mut rots = Vec::new();
        for i in 0..image.lens.len() {
            items.push(Tensor::cat(&[image.item(i)?, caption.item(i)?], 0)?);
            let (ni, nc) = (image.lens[i], caption.lens[i]);
            let join = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
                Tensor::cat(
                    &[a.get(i)?.narrow(0, 0, ni)?, b.get(i)?.narrow(0, 0, nc)?],
                    0,
                )
            };
            rots.push(Rotation {
                cos: join(&image.rot.cos, &caption.rot.cos)?,
                sin: join(&image.rot.sin, &caption.rot.sin)?,
            });
        }
        Sequence::pad(items, rots)
    }
}

/// The output of the embedding stage.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The adaLN input (B, adaln_dim).
    pub c: Tensor,
    pub image: Sequence,
    pub caption: Sequence,
    /// The image token grid (H/p, W/p).
    pub grid: (usize, usize),
}

/// `x ⊙ by` (broadcast over tokens), or x itself for an unmodulated block.
fn times(x: &Tensor, by: Option<&Tensor>) -> Result<Tensor> {
    match by {
        Some(by) => x.broadcast_mul(by),
        None => Ok(x.clone()),
    }
}

/// Runs a block stack over a sequence (each block's tape is dropped as soon as it is made).
fn run(blocks: &BlockStack, mut seq: Sequence, c: Option<&Tensor>, grad: Grad) -> Result<Sequence> {
    for item in blocks.walk(0..blocks.len()) {
        let (_, block) = item?;
        seq.x = block
            .forward_taped(&seq.x, &seq.rot, seq.mask.as_ref(), c, grad)?
            .0;
    }
    Ok(seq)
}

/// How the frozen base is held: its blocks' Linears quantized or in the compute dtype; every
/// main layer on the device, or only the first `blocks_on_device` (block swap); the text
/// encoder's decoder layers quantized or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BaseStorage {
    pub quantize: Option<Quantization>,
    pub blocks_on_device: Option<usize>,
    pub quantize_text_encoder: Option<Quantization>,
}

impl BaseStorage {
    /// Refuses what this transformer cannot take (a quantization whose blocks do not divide
    /// its widths, more blocks on the device than it has), before anything is loaded.
    pub fn check(&self, cfg: &TransformerConfig) -> crate::Result<()> {
        if let Some(q) = self.quantize {
            ZImageTransformer::check_quantization(cfg, q).map_err(crate::Error::Invalid)?;
        }
        if let Some(n) = self.blocks_on_device {
            ZImageTransformer::check_blocks_on_device(cfg, n).map_err(crate::Error::Invalid)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ZImageTransformer {
    cfg: TransformerConfig,
    t_embedder: TimestepEmbedder,
    x_embedder: Linear,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    noise_refiner: BlockStack,
    context_refiner: BlockStack,
    /// The main layers, the only stack block swap applies to.
    layers: BlockStack,
    final_layer: FinalLayer,
    rope: RopeEmbedder,
    dtype: DType,
    /// Every adapter-capable Linear, listed once at load time.
    linear_shapes: Vec<(String, (usize, usize))>,
}

impl ZImageTransformer {
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, vb, BaseStorage::default())
    }

    /// Why `blocks_on_device` blocks cannot stay on the device, if they cannot.
    pub fn check_blocks_on_device(
        cfg: &TransformerConfig,
        blocks_on_device: usize,
    ) -> std::result::Result<(), String> {
        if blocks_on_device > cfg.n_layers {
            return Err(format!(
                "blocks_on_device (--blocks-on-device) {blocks_on_device} is more than this \
                 transformer's {} layers: use at most {} (or leave it unset to keep every \
                 block on the device)",
                cfg.n_layers, cfg.n_layers
            ));
        }
        Ok(())
    }

    /// Why `q` cannot store this config's block Linears (their input widths), if it cannot.
    pub fn check_quantization(
        cfg: &TransformerConfig,
        q: Quantization,
    ) -> std::result::Result<(), String> {
        let widths = [
            ("dim", cfg.dim),
            ("ffn", cfg.ffn_dim()),
            ("adaLN", cfg.adaln_dim()),
        ];
        let bad: Vec<String> = widths
            .iter()
            .filter(|(_, w)| w % q.row_multiple() != 0)
            .map(|(n, w)| format!("{n} {w}"))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(format!(
            "quantization {q} stores rows in blocks of {} values, but this transformer's block \
             Linears take widths {}: use a format whose block divides them (int8 and fp8 take \
             any width, q8_0 multiples of 32)",
            q.row_multiple(),
            bad.join(", ")
        ))
    }

    /// The transformer with its blocks' Linears stored as `quantize`, each block quantized as
    /// soon as it is read, so at most one block is ever dense in memory. The embedders, the
    /// final layer and the norms stay in the compute dtype: they are small, and their
    /// gradients go through candle's autograd.
    ///
    /// With `blocks_on_device`, the main layers after the first N keep their frozen weights
    /// in host memory ([`BlockStack`]).
    pub fn load(cfg: &TransformerConfig, vb: VarBuilder, storage: BaseStorage) -> Result<Self> {
        let BaseStorage {
            quantize,
            blocks_on_device,
            ..
        } = storage;
        if let Some(n) = blocks_on_device {
            Self::check_blocks_on_device(cfg, n).map_err(candle_core::Error::Msg)?;
        }
        let blocks = |name: &str, n: usize, modulated: bool, resident: usize| {
            let each = (0..n).map(|i| {
                let mut block = TransformerBlock::new(vb.pp(name).pp(i), cfg, modulated)?;
                if let Some(q) = quantize {
                    block.quantize(q)?;
                }
                Ok(block)
            });
            BlockStack::new(each, resident)
        };
        let all = usize::MAX;
        let key = cfg.patch_key();
        let mut model = Self {
            t_embedder: TimestepEmbedder::new(vb.pp("t_embedder"), cfg.adaln_dim())?,
            x_embedder: linear(
                &vb.pp("all_x_embedder").pp(&key),
                cfg.dim,
                cfg.patch_dim(),
                true,
            )?,
            cap_norm: RmsNorm::load(
                vb.pp("cap_embedder").pp("0"),
                cfg.cap_feat_dim,
                cfg.norm_eps,
            )?,
            cap_linear: linear(
                &vb.pp("cap_embedder").pp("1"),
                cfg.dim,
                cfg.cap_feat_dim,
                true,
            )?,
            x_pad_token: vb.get((1, cfg.dim), "x_pad_token")?,
            cap_pad_token: vb.get((1, cfg.dim), "cap_pad_token")?,
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true, all)?,
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false, all)?,
            layers: blocks(
                "layers",
                cfg.n_layers,
                true,
                blocks_on_device.unwrap_or(all),
            )?,
            final_layer: FinalLayer::new(vb.pp("all_final_layer").pp(&key), cfg)?,
            rope: RopeEmbedder::new(cfg.rope_theta, &cfg.axes_dims, &cfg.axes_lens),
            dtype: vb.dtype(),
            cfg: cfg.clone(),
            linear_shapes: Vec::new(),
        };
        model.linear_shapes = model
            .all_linears()
            .into_iter()
            .map(|(name, l)| (name, l.shape()))
            .collect();
        Ok(model)
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.x_pad_token.device()
    }

    /// The raw model output (the reference's, before the pipeline negates it), for inference:
    /// no autograd graph is recorded, not even through trainable adapters (a sampler that
    /// kept one would hold every activation of every denoising step).
    ///
    /// `latents`: (B, C, H, W) in the transformer's latent space; `t`: (B,) the model's time
    /// t = 1 − σ (f32); `caps`: per item, the text features (L_i, cap_feat_dim) without
    /// padding. Returns (B, C, H, W) in f32.
    pub fn forward(&self, latents: &Tensor, t: &Tensor, caps: &[Tensor]) -> Result<Tensor> {
        self.forward_with(latents, t, caps, Grad::ByHand)
    }

    /// [`Self::forward`] recording candle's autograd graph through every op (what the
    /// hand-written backward is tested against).
    pub fn forward_autograd(
        &self,
        latents: &Tensor,
        t: &Tensor,
        caps: &[Tensor],
    ) -> Result<Tensor> {
        self.forward_with(latents, t, caps, Grad::Autograd)
    }

    fn forward_with(
        &self,
        latents: &Tensor,
        t: &Tensor,
        caps: &[Tensor],
        grad: Grad,
    ) -> Result<Tensor> {
        let e = self.embed_with(latents, t, caps, grad)?;
        let image = run(&self.noise_refiner, e.image, Some(&e.c), grad)?;
        let caption = run(&self.context_refiner, e.caption, None, grad)?;
        let unified = run(
            &self.layers,
            Sequence::unify(&image, &caption)?,
            Some(&e.c),
            grad,
        )?;
        self.finish_with(&unified.x, &e.c, e.grid, grad)
    }

    /// The first stage with autograd (training differentiates it with candle): timestep
    /// embedding c, embedded image and caption sequences.
    pub fn embed(&self, latents: &Tensor, t: &Tensor, caps: &[Tensor]) -> Result<Embedded> {
        self.embed_with(latents, t, caps, Grad::Autograd)
    }

    fn embed_with(
        &self,
        latents: &Tensor,
        t: &Tensor,
        caps: &[Tensor],
        grad: Grad,
    ) -> Result<Embedded> {
        let (b, _, h, w) = latents.dims4()?;
        if caps.len() != b || t.dims1()? != b {
            candle_core::bail!("batch of {b} latents needs {b} captions and timesteps");
        }
        let p = self.cfg.patch_size();
        if h % p != 0 || w % p != 0 {
            candle_core::bail!("latent size {h}×{w} is not a multiple of the patch size {p}");
        }
        let grid = (h / p, w / p);
        let c = self.t_embedder.forward(
            &(t.to_dtype(DType::F32)? * self.cfg.t_scale)?,
            self.dtype,
            grad,
        )?;
        let cap_lens: Vec<usize> = caps
            .iter()
            .map(|c| round_up(c.dim(0).unwrap_or(0)))
            .collect();
        Ok(Embedded {
            image: self.embed_image(latents, &cap_lens, grid, grad)?,
            caption: self.embed_captions(caps, grad)?,
            c,
            grid,
        })
    }

    /// The block stacks in the order they run: noise refiner (image tokens, modulated),
    /// context refiner (caption tokens, unmodulated), main layers (unified, modulated).
    pub fn noise_refiner(&self) -> &BlockStack {
        &self.noise_refiner
    }

    pub fn context_refiner(&self) -> &BlockStack {
        &self.context_refiner
    }

    pub fn layers(&self) -> &BlockStack {
        &self.layers
    }

    /// What block swap has moved to the device since loading.
    pub fn transfers(&self) -> Transfers {
        self.layers.transfers()
    }

    /// The last stage with autograd: final layer on the unified tokens, keep the image
    /// tokens, unpatchify.
    pub fn finish(&self, unified: &Tensor, c: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        self.finish_with(unified, c, grid, Grad::Autograd)
    }

    fn finish_with(
        &self,
        unified: &Tensor,
        c: &Tensor,
        grid: (usize, usize),
        grad: Grad,
    ) -> Result<Tensor> {
        let out = self.final_layer.forward(unified, c, grad)?;
        self.unpatchify(&out.narrow(1, 0, grid.0 * grid.1)?, grid.0, grid.1)
    }

    /// Patchify → x_embedder → pad with `x_pad_token` to a multiple of 32 tokens.
    fn embed_image(
        &self,
        latents: &Tensor,
        cap_lens: &[usize],
        (ht, wt): (usize, usize),
        grad: Grad,
    ) -> Result<Sequence> {
        let (b, ch, _, _) = latents.dims4()?;
        let p = self.cfg.patch_size();
        let patches = latents
            .to_dtype(self.dtype)?
            .reshape((b, ch, ht, p, wt, p))?
            .permute((0, 2, 4, 3, 5, 1))?
            .reshape((b, ht * wt, p * p * ch))?;
        let n = ht * wt;
        let np = round_up(n);
        let x = grad.linear(&self.x_embedder, &patches)?;
        let x = if np > n {
            let pad =
                self.x_pad_token
                    .to_dtype(self.dtype)?
                    .broadcast_as((b, np - n, self.cfg.dim))?;
            Tensor::cat(&[&x, &pad], 1)?
        } else {
            x
        };
        let rots = cap_lens
            .iter()
            .map(|&lp| {
                let mut pos: Vec<Position> = (0..ht)
                    .flat_map(|i| (0..wt).map(move |j| [lp + 1, i, j]))
                    .collect();
                pos.resize(np, [0, 0, 0]);
                self.rope.rotation(&pos, latents.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let items = (0..b).map(|i| x.get(i)).collect::<Result<Vec<_>>>()?;
        Sequence::pad(items, rots)
    }

    /// cap_embedder (RMSNorm, Linear) → pad each caption with `cap_pad_token` to a multiple
    /// of 32; positions (k+1, 0, 0) including the pad tokens.
    fn embed_captions(&self, caps: &[Tensor], grad: Grad) -> Result<Sequence> {
        let pad_token = self.cap_pad_token.to_dtype(self.dtype)?;
        let mut items = Vec::with_capacity(caps.len());
        let mut rots = Vec::with_capacity(caps.len());
        for cap in caps {
            let len = cap.dim(0)?;
            if len == 0 {
                candle_core::bail!("empty caption features");
            }
            let lp = round_up(len);
            let x = self.cap_norm.forward(&cap.to_dtype(self.dtype)?)?;
            let x = grad.linear(&self.cap_linear, &x)?;
            let x = if lp > len {
                Tensor::cat(&[&x, &pad_token.broadcast_as((lp - len, self.cfg.dim))?], 0)?
            } else {
                x
            };
            let pos: Vec<Position> = (0..lp).map(|k| [k + 1, 0, 0]).collect();
            rots.push(self.rope.rotation(&pos, cap.device())?);
            items.push(x);
        }
        Sequence::pad(items, rots)
    }

    /// (B, N, p·p·C) tokens → (B, C, H, W), f32.
    fn unpatchify(&self, x: &Tensor, ht: usize, wt: usize) -> Result<Tensor> {
        let b = x.dim(0)?;
        let p = self.cfg.patch_size();
        let ch = self.cfg.in_channels;
        x.to_dtype(DType::F32)?
            .reshape((b, ht, wt, p, p, ch))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, ch, ht * p, wt * p))
    }

    fn all_linears(&mut self) -> Vec<(String, &mut Linear)> {
        let key = self.cfg.patch_key();
        let mut out: Vec<(String, &mut Linear)> = vec![
            (format!("all_x_embedder.{key}"), &mut self.x_embedder),
            ("cap_embedder.1".into(), &mut self.cap_linear),
            ("t_embedder.mlp.0".into(), &mut self.t_embedder.mlp0),
            ("t_embedder.mlp.2".into(), &mut self.t_embedder.mlp2),
            (
                format!("all_final_layer.{key}.linear"),
                &mut self.final_layer.linear,
            ),
            (
                format!("all_final_layer.{key}.adaLN_modulation.1"),
                &mut self.final_layer.ada_ln_modulation,
            ),
        ];
        for (name, stack) in [
            ("noise_refiner", &mut self.noise_refiner),
            ("context_refiner", &mut self.context_refiner),
            ("layers", &mut self.layers),
        ] {
            for (i, block) in stack.blocks_mut().iter_mut().enumerate() {
                out.extend(block.linears(&format!("{name}.{i}")));
            }
        }
        out
    }
}

impl LinearTargets for ZImageTransformer {
    fn linear_shapes(&self) -> Vec<(String, (usize, usize))> {
        self.linear_shapes.clone()
    }

    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        self.all_linears()
            .into_iter()
            .find(|(name, _)| name == path)
            .map(|(_, l)| l)
    }

    fn placement(&self) -> (Device, DType) {
        (self.device().clone(), self.dtype)
    }
}
