//! Qwen3-VL's vision tower, as transformers' `Qwen3VLVisionModel`: patch embedding (a Conv3d
//! whose kernel equals its stride, so one matmul over the patch rows), learned positions
//! resampled bilinearly (align_corners) to each image's grid, 2D rotary embeddings (rows on
//! the first quarter of each head, columns on the second, repeated), full attention within
//! each image, the 2×2 patch merger, and the DeepStack mergers after the listed blocks.
//!
//! candle-transformers 0.11.1 has this tower too, but private to a model whose text decoder
//! lacks M-RoPE and a causal mask on the prompt, and its mergers use the tanh GELU where the
//! reference uses the exact one (docs/caption.md).

use candle_core::{Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::config::VisionConfig;
use super::linear;
use super::preprocess::merge_block_order;
use crate::model::qwen3::{inverse_frequencies, Rotary};
use crate::nn::attention::attention;
use crate::nn::{Linear, Quantization};
use crate::Result;

const LN_EPS: f64 = 1e-6;

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let (d, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            norm1: candle_nn::layer_norm(d, LN_EPS, vb.pp("norm1"))?,
            norm2: candle_nn::layer_norm(d, LN_EPS, vb.pp("norm2"))?,
            qkv: linear(d, 3 * d, true, vb.pp("attn.qkv"), q)?,
            proj: linear(d, d, true, vb.pp("attn.proj"), q)?,
            fc1: linear(d, inter, true, vb.pp("mlp.linear_fc1"), q)?,
            fc2: linear(inter, d, true, vb.pp("mlp.linear_fc2"), q)?,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, rope: &Rotary, lengths: &[usize]) -> Result<Tensor> {
        let h = self.attend(&self.norm1.forward(x)?, rope, lengths)?;
        let x = (x + h)?;
        // gelu_pytorch_tanh: candle's `gelu` is the tanh approximation.
        let h = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu()?)?;
        Ok((x + h)?)
    }

    /// Attention over each image's patches on its own (transformers' cu_seqlens).
    fn attend(&self, x: &Tensor, rope: &Rotary, lengths: &[usize]) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((n, 3, self.heads, d / self.heads))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(1, i, 1)?.squeeze(1)?) };
        let q = rope.apply(&part(0)?)?;
        let k = rope.apply(&part(1)?)?;
        let v = part(2)?;
        let mut outs = Vec::with_capacity(lengths.len());
        let mut start = 0;
        for &len in lengths {
            // (len, heads, hd) → (1, heads, len, hd)
            let heads = |t: &Tensor| -> Result<Tensor> {
                Ok(t.narrow(0, start, len)?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .contiguous()?)
            };
            let (out, _) = attention(&heads(&q)?, &heads(&k)?, &heads(&v)?, None)?;
            outs.push(out.squeeze(0)?.transpose(0, 1)?.reshape((len, d))?);
            start += len;
        }
        Ok(self.proj.forward(&Tensor::cat(&outs, 0)?)?)
    }
}

/// The rotary tables of every patch row, (N, 1, head_dim): the row position on the first
/// head_dim / 4 frequencies, the column on the next head_dim / 4, then both halves again
/// (rotate-half layout).
fn rotary(cfg: &VisionConfig, grids: &[[usize; 3]], device: &Device) -> Result<Rotary> {
    let spatial = cfg.head_dim() / 2;
    let inv_freq = inverse_frequencies(spatial, cfg.rope_theta);
    let mut angles = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for (row, col) in merge_block_order(h, w, cfg.spatial_merge_size) {
                angles.extend(inv_freq.iter().map(|f| row as f32 * f));
                angles.extend(inv_freq.iter().map(|f| col as f32 * f));
            }
        }
    }
    let n = angles.len() / spatial;
    Rotary::from_angles(&Tensor::from_vec(angles, (n, 1, spatial), device)?)
}

/// 2×2 patch merger: LayerNorm before (main merger) or after (DeepStack) grouping each merge
/// block's patches into one row, then Linear, exact GELU, Linear.
struct Merger {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    grouped: usize,
    norm_after_grouping: bool,
}

impl Merger {
    fn new(
        cfg: &VisionConfig,
        norm_after_grouping: bool,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let grouped = cfg.hidden_size * cfg.spatial_merge_size.pow(2);
        let norm_dim = if norm_after_grouping {
            grouped
        } else {
            cfg.hidden_size
        };
        Ok(Self {
            norm: candle_nn::layer_norm(norm_dim, LN_EPS, vb.pp("norm"))?,
            fc1: linear(grouped, grouped, true, vb.pp("linear_fc1"), q)?,
            fc2: linear(grouped, cfg.out_hidden_size, true, vb.pp("linear_fc2"), q)?,
            grouped,
            norm_after_grouping,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.grouped;
        let x = if self.norm_after_grouping {
            self.norm.forward(&x.reshape((rows, self.grouped))?)?
        } else {
            self.norm.forward(x)?.reshape((rows, self.grouped))?
        };
        Ok(self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)?)
    }
}

/// The tower's output for a batch of images: merged embeddings (one row per placeholder
/// token) and one DeepStack tensor of the same shape per early decoder layer.
pub struct VisionFeatures {
    pub embeds: Tensor,
    pub deepstack: Vec<Tensor>,
}

pub struct VisionModel {
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<(usize, Merger)>,
    cfg: VisionConfig,
}

impl VisionModel {
    /// `vb` at `model.visual`. The blocks' and mergers' Linears are stored as `q` when given;
    /// the patch embedding and positions stay dense.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let (d, t, p) = (cfg.hidden_size, cfg.temporal_patch_size, cfg.patch_size);
        let conv = vb.get((d, cfg.in_channels, t, p, p), "patch_embed.proj.weight")?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}")), q))
            .collect::<Result<_>>()?;
        let deepstack = cfg
            .deepstack_visual_indexes
            .iter()
            .enumerate()
            .map(|(i, &layer)| {
                let merger =
                    Merger::new(cfg, true, vb.pp(format!("deepstack_merger_list.{i}")), q)?;
                Ok((layer, merger))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_weight: conv.reshape((d, cfg.patch_dim()))?,
            patch_bias: vb.get(d, "patch_embed.proj.bias")?,
            pos_embed: vb.get((cfg.num_position_embeddings, d), "pos_embed.weight")?,
            blocks,
            merger: Merger::new(cfg, false, vb.pp("merger"), q)?,
            deepstack,
            cfg: cfg.clone(),
        })
    }

    /// pixels: (patches, patch_dim) in the model's dtype and device; grids per image.
    pub fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<VisionFeatures> {
        let x = pixels.matmul(&self.patch_weight.t()?)?;
        let x = x.broadcast_add(&self.patch_bias)?;
        let mut x = (x + self.positions(grids, pixels.device())?)?;
        let rope = rotary(&self.cfg, grids, pixels.device())?;
        let lengths: Vec<usize> = grids
            .iter()
            .flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t))
            .collect();
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &rope, &lengths)?;
            for (_, merger) in self.deepstack.iter().filter(|(layer, _)| *layer == i) {
                deepstack.push(merger.forward(&x)?);
            }
        }
        Ok(VisionFeatures {
            embeds: self.merger.forward(&x)?,
            deepstack,
        })
    }

    /// The learned position grid resampled to each image: four bilinear taps per patch, in
    /// the f32 arithmetic of transformers' `get_vision_interpolation_indices_and_weights`.
    fn positions(&self, grids: &[[usize; 3]], device: &Device) -> Result<Tensor> {
        let side = self.cfg.grid_side();
        let mut taps: [Vec<u32>; 4] = Default::default();
        let mut weights: [Vec<f32>; 4] = Default::default();
        for &[t, h, w] in grids {
            for _ in 0..t {
                for (row, col) in merge_block_order(h, w, self.cfg.spatial_merge_size) {
                    let (rt, rw) = axis_taps(row, h, side);
                    let (ct, cw) = axis_taps(col, w, side);
                    for (k, (i, j)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                        taps[k].push((rt[i] * side + ct[j]) as u32);
                        weights[k].push(rw[i] * cw[j]);
                    }
                }
            }
        }
        let dtype = self.pos_embed.dtype();
        let mut sum: Option<Tensor> = None;
        for (idx, w) in taps.into_iter().zip(weights) {
            let n = idx.len();
            let rows = self
                .pos_embed
                .index_select(&Tensor::from_vec(idx, n, device)?, 0)?;
            let w = Tensor::from_vec(w, (n, 1), device)?.to_dtype(dtype)?;
            let term = rows.broadcast_mul(&w)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum.expect("four taps"))
    }
}

/// The two taps (floor, floor + 1, clamped) and their weights along one axis of `size`
/// patches read from a table of `side` entries, endpoints aligned.
fn axis_taps(index: usize, size: usize, side: usize) -> ([usize; 2], [f32; 2]) {
    let src = index as f32 * (side - 1) as f32 / (size.max(2) - 1) as f32;
    let floor = src.floor();
    let taps = [floor as usize, (floor as usize + 1).min(side - 1)];
    let weights = [
        (1.0 - (src - floor).abs()).max(0.0),
        (1.0 - (src - floor - 1.0).abs()).max(0.0),
    ];
    (taps, weights)
}
