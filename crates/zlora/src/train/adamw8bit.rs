//! 8-bit AdamW as bitsandbytes' `AdamW8bit` keeps its moments: block-wise quantized. Each
//! moment is stored as one byte per element, an index into a 256-value "dynamic" map (signed
//! for the first moment, unsigned for the second), scaled per block of 256 elements by the
//! block's largest magnitude (absmax, f32). A step dequantizes, applies the f32 AdamW update
//! (the same formula as [`super::optim::AdamW`]) and quantizes the new moments to the nearest
//! code. As bitsandbytes, tensors under 4096 elements keep f32 moments (min_8bit_size).
//!
//! bitsandbytes' 8-bit optimizers used blocks of 2048 until its CUDA kernels moved to 256
//! (0.45 onwards, `BLOCKSIZE_2STATE` in csrc/ops.cu); 256 is the current and the finer one.

use candle_core::{DType, Device, Tensor, Var};

use super::optim::{adam_update, device_of, AdamWConfig};
use crate::Result;

/// Elements per quantization block.
pub const BLOCK: usize = 256;
/// Smaller tensors keep f32 moments (bitsandbytes' min_8bit_size).
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: for each of
/// 7 decades 10^-6 … 10^0 the midpoints of an even split of [0.1, 1] (2^i of them for decade
/// i, twice as many unsigned), mirrored when signed, plus 0 and 1; sorted.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let mut data = vec![0f32, 1.0];
    for i in 0..7 {
        let items = if signed { 1usize << i } else { 2usize << i };
        let bounds = linspace(0.1, 1.0, items + 1);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.sort_by(f32::total_cmp);
    data
}

/// torch.linspace for f32 on the CPU: computed in f64 (the first half counted up from
/// `start`, the rest down from `end`), then rounded.
fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    let (start, end) = (start as f64, end as f64);
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| match i < n / 2 {
            true => start + step * i as f64,
            false => end - step * (n - 1 - i) as f64,
        } as f32)
        .collect()
}

/// One moment of one parameter.
enum Moment {
    Full(Tensor),
    Quantized { codes: Tensor, absmax: Tensor },
}

/// A dynamic map on the device with the midpoints between its neighbours (nearest rounding).
struct Map {
    values: Tensor,
    /// Entry k is the midpoint between codes k − 1 and k (entry 0, below every code, is −∞).
    midpoints: Tensor,
}

impl Map {
    fn new(signed: bool, device: &Device) -> Result<Self> {
        let v = dynamic_map(signed);
        let mut mids = vec![f32::NEG_INFINITY];
        mids.extend(v.windows(2).map(|w| (w[0] + w[1]) / 2.0));
        Ok(Self {
            values: Tensor::new(v, device)?,
            midpoints: Tensor::new(mids, device)?,
        })
    }

    /// The tensor as (codes u8 [blocks, BLOCK], absmax f32 [blocks, 1]); the tail block is
    /// padded with zeros.
    fn quantize(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.elem_count();
        let blocks = n.div_ceil(BLOCK);
        let flat = x.flatten_all()?.pad_with_zeros(0, 0, blocks * BLOCK - n)?;
        let blocked = flat.reshape((blocks, BLOCK))?;
        let absmax = blocked.abs()?.max_keepdim(1)?;
        // An all-zero block divides by 1 instead of 0 (every code is then 0's).
        let safe = absmax.eq(0f64)?.where_cond(&absmax.ones_like()?, &absmax)?;
        let scaled = blocked.broadcast_div(&safe)?.flatten_all()?;
        let codes = self.nearest(&scaled)?.to_dtype(DType::U8)?;
        Ok((codes.reshape((blocks, BLOCK))?, absmax))
    }

    /// Each value's nearest code: the number of midpoints below it, found by a binary search
    /// over the sorted midpoints (8 halvings of 256 codes), so the work and memory stay
    /// proportional to the tensor.
    fn nearest(&self, x: &Tensor) -> Result<Tensor> {
        let mut code = Tensor::zeros(x.elem_count(), DType::U32, x.device())?;
        for half in [128u32, 64, 32, 16, 8, 4, 2, 1] {
            let candidate = code.affine(1.0, half as f64)?;
            let below = self
                .midpoints
                .index_select(&candidate.affine(1.0, -1.0)?, 0)?;
            code = x.gt(&below)?.where_cond(&candidate, &code)?;
        }
        Ok(code)
    }

    fn dequantize(&self, codes: &Tensor, absmax: &Tensor, like: &Tensor) -> Result<Tensor> {
        let idx = codes.flatten_all()?.to_dtype(DType::U32)?;
        let values = self.values.index_select(&idx, 0)?.reshape(codes.shape())?;
        let flat = values.broadcast_mul(absmax)?.flatten_all()?;
        Ok(flat
            .narrow(0, 0, like.elem_count())?
            .reshape(like.shape())?)
    }
}

impl Moment {
    fn zeros(var: &Var, map: &Map) -> Result<Self> {
        let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
        if var.elem_count() < MIN_8BIT_SIZE {
            return Ok(Moment::Full(z));
        }
        let (codes, absmax) = map.quantize(&z)?;
        Ok(Moment::Quantized { codes, absmax })
    }

    fn value(&self, map: &Map, like: &Tensor) -> Result<Tensor> {
        match self {
            Moment::Full(t) => Ok(t.clone()),
            Moment::Quantized { codes, absmax } => map.dequantize(codes, absmax, like),
        }
    }

    fn store(&mut self, map: &Map, x: Tensor) -> Result<()> {
        match self {
            Moment::Full(t) => *t = x,
            Moment::Quantized { codes, absmax } => (*codes, *absmax) = map.quantize(&x)?,
        }
        Ok(())
    }

    fn slots<'a>(&'a mut self, name: String, out: &mut Vec<(String, &'a mut Tensor)>) {
        match self {
            Moment::Full(t) => out.push((name, t)),
            Moment::Quantized { codes, absmax } => {
                out.push((format!("{name}.codes"), codes));
                out.push((format!("{name}.absmax"), absmax));
            }
        }
    }
}

pub struct AdamW8bit {
    cfg: AdamWConfig,
    signed: Map,
    unsigned: Map,
    m: Vec<Moment>,
    v: Vec<Moment>,
}

impl AdamW8bit {
    pub fn new(cfg: AdamWConfig, vars: &[&Var]) -> Result<Self> {
        let device = device_of(vars)?;
        let (signed, unsigned) = (Map::new(true, &device)?, Map::new(false, &device)?);
        let zeros = |map: &Map| {
            vars.iter()
                .map(|v| Moment::zeros(v, map))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            cfg,
            m: zeros(&signed)?,
            v: zeros(&unsigned)?,
            signed,
            unsigned,
        })
    }

    /// AdamW on the dequantized moments; the new moments are stored quantized.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64, t: u64) -> Result<()> {
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = self.m[i].value(&self.signed, g)?;
            let v = self.v[i].value(&self.unsigned, g)?;
            let (m, v) = adam_update(&self.cfg, var, g, &m, &v, lr, t)?;
            self.m[i].store(&self.signed, m)?;
            self.v[i].store(&self.unsigned, v)?;
        }
        Ok(())
    }

    pub(crate) fn slots(&mut self, names: &[String]) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        for ((n, m), v) in names.iter().zip(&mut self.m).zip(&mut self.v) {
            m.slots(format!("{n}.exp_avg"), &mut out);
            v.slots(format!("{n}.exp_avg_sq"), &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::train::optim::AdamW;

    fn fixture() -> HashMap<String, Tensor> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/optim/bnb_blockwise.safetensors"
        );
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    /// Both maps equal bitsandbytes' `create_dynamic_map` within 2 f32 ulps (torch's
    /// linspace and scalar products round a little differently from ours).
    #[test]
    fn the_maps_are_bitsandbytes_dynamic_maps() -> Result<()> {
        let f = fixture();
        for (kind, signed) in [("signed", true), ("unsigned", false)] {
            let want = f[&format!("{kind}.map")].to_vec1::<f32>()?;
            let got = dynamic_map(signed);
            assert_eq!(got.len(), 256);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 2.0 * w.abs() * f32::EPSILON,
                    "{kind}: {g} vs {w}"
                );
            }
        }
        Ok(())
    }

    /// bitsandbytes' quantize_blockwise (blocks of 256, a tail block of 232) gives the same
    /// scales; for a first moment the same codes; for a second moment (unsigned map) its CPU
    /// build misses the nearest code for 40 of the 1000 small values, so there every code
    /// of zlora's must be at least as near as bitsandbytes'. Dequantizing gives each
    /// element back within half the widest gap of the map times its block's absmax.
    #[test]
    fn quantization_matches_bitsandbytes() -> Result<()> {
        let f = fixture();
        for (kind, signed) in [("signed", true), ("unsigned", false)] {
            let map = Map::new(signed, &Device::Cpu)?;
            let x = &f[&format!("{kind}.x")];
            let (codes, absmax) = map.quantize(x)?;
            let scales = absmax.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(scales, f[&format!("{kind}.absmax")].to_vec1::<f32>()?);
            let n = x.elem_count();
            let got = codes.flatten_all()?.narrow(0, 0, n)?.to_vec1::<u8>()?;
            let want = f[&format!("{kind}.codes")].to_vec1::<u8>()?;
            let values = dynamic_map(signed);
            let xs = x.to_vec1::<f32>()?;
            for (i, ((g, w), v)) in got.iter().zip(&want).zip(&xs).enumerate() {
                let r = v / scales[i / BLOCK];
                let dist = |c: &u8| (r - values[*c as usize]).abs();
                match signed {
                    true => assert_eq!(g, w, "{kind} element {i}"),
                    false => assert!(dist(g) <= dist(w), "{kind} element {i}: {g} vs {w}"),
                }
            }
            // The farthest any r in [-1, 1] is from its code: half the widest gap, or the
            // distance from -1 to the lowest signed code (the signed map has 1, not -1).
            let half_gap = values.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0;
            let worst = half_gap.max(values[0] + 1.0);
            let back = map.dequantize(&codes, &absmax, x)?.to_vec1::<f32>()?;
            for (i, (b, v)) in back.iter().zip(&xs).enumerate() {
                // + 2 ulps of the scale: the rounding of code × absmax.
                let bound = (worst + 2.0 * f32::EPSILON) * scales[i / BLOCK];
                assert!((b - v).abs() <= bound, "{kind} element {i}: {b} vs {v}");
            }
        }
        Ok(())
    }

    /// 20 steps of 8-bit AdamW against f32 AdamW on the same gradients (LoRA factors of
    /// 16 × 384 and 384 × 16, quantized, and a 4 × 48 one under min_8bit_size, kept f32).
    ///
    /// The bound: one quantization moves a moment by at most `worst` × its block's absmax per
    /// element (see above), so by at most 16 · `worst` (√256 elements per block, each block's
    /// absmax ≤ the moment's norm) of the moment's L2 norm: 11 %. The update is a ratio of
    /// the two moments and earlier errors decay with beta1 and beta2, so the distance from
    /// the f32 run's parameters stays below that fraction of how far those moved. The small
    /// factor takes the f32 path: the same bits as AdamW.
    #[test]
    fn eight_bit_adamw_stays_near_f32_adamw() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut draw = |shape: (usize, usize), scale: f32| {
            let n = shape.0 * shape.1;
            let v: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() - 0.5) * scale)
                .collect();
            Tensor::from_vec(v, shape, &dev)
        };
        let shapes = [(16, 384), (384, 16), (4, 48)];
        let init: Vec<Tensor> = shapes
            .iter()
            .map(|&s| draw(s, 0.1))
            .collect::<candle_core::Result<_>>()?;
        let direction: Vec<Tensor> = shapes
            .iter()
            .map(|&s| draw(s, 1e-2))
            .collect::<candle_core::Result<_>>()?;
        let vars = |init: &[Tensor]| -> Result<Vec<Var>> {
            Ok(init
                .iter()
                .map(|t| Var::from_tensor(&t.copy()?))
                .collect::<candle_core::Result<_>>()?)
        };
        let (exact, eight) = (vars(&init)?, vars(&init)?);
        let (re, r8): (Vec<&Var>, Vec<&Var>) = (exact.iter().collect(), eight.iter().collect());
        let cfg = AdamWConfig::default();
        let mut f32_opt = AdamW::new(cfg, &re)?;
        let mut q_opt = AdamW8bit::new(cfg, &r8)?;
        for t in 1..=20u64 {
            let grads: Vec<Tensor> = direction
                .iter()
                .zip(&shapes)
                .map(|(d, &s)| d + draw(s, 1e-2)?)
                .collect::<candle_core::Result<_>>()?;
            f32_opt.step(&re, &grads, 1e-3, t)?;
            q_opt.step(&r8, &grads, 1e-3, t)?;
        }
        let values = dynamic_map(true);
        let half_gap = values.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0;
        let bound = 16.0 * half_gap.max(values[0] + 1.0) as f64;
        let norm = |t: Tensor| -> Result<f64> {
            Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)
        };
        for (i, s) in shapes.iter().enumerate() {
            let (e, q) = (exact[i].as_tensor(), eight[i].as_tensor());
            let drift = norm((q - e)?)? / norm((e - &init[i])?)?;
            eprintln!("{s:?}: |p8 - p32| / |p32 - p0| = {drift:.3e} (bound {bound:.3e})");
            match s.0 * s.1 < MIN_8BIT_SIZE {
                true => assert_eq!(drift, 0.0, "{s:?} took the f32 path"),
                false => assert!(drift > 0.0 && drift <= bound, "{s:?}: {drift} > {bound}"),
            }
        }
        Ok(())
    }
}
