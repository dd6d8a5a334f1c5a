//! Quantized frozen weights: a Linear's base weight stored in 8 or fewer bits, for a base that
//! fits smaller memories. The weight is never dequantized as a whole model: candle's GGUF
//! formats (q8_0, q6_k, q5_k, q4_k) multiply with candle's quantized matmul kernels (CPU,
//! CUDA, Metal), and int8 / fp8 dequantize one Linear's weight at a time to the compute dtype.
//! The input gradient dx = dy·W (which no quantized kernel computes: it needs W's transpose)
//! dequantizes that one Linear's weight too.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// How a frozen weight is stored; names as users write them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Quantization {
    /// e4m3 values with a per-row f32 scale.
    Fp8,
    /// Signed 8-bit integers with a per-row f32 scale.
    Int8,
    Q8_0,
    Q6K,
    Q5K,
    Q4K,
}

const NAMES: [(Quantization, &str); 6] = [
    (Quantization::Fp8, "fp8"),
    (Quantization::Int8, "int8"),
    (Quantization::Q8_0, "q8_0"),
    (Quantization::Q6K, "q6_k"),
    (Quantization::Q5K, "q5_k"),
    (Quantization::Q4K, "q4_k"),
];

impl Quantization {
    pub const ALL: [Quantization; 6] = [
        Self::Fp8,
        Self::Int8,
        Self::Q8_0,
        Self::Q6K,
        Self::Q5K,
        Self::Q4K,
    ];

    /// The GGML type of a GGUF format; None for fp8 and int8, which GGUF has no type for.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::Fp8 | Self::Int8 => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q6K => Some(GgmlDType::Q6K),
            Self::Q5K => Some(GgmlDType::Q5K),
            Self::Q4K => Some(GgmlDType::Q4K),
        }
    }

    /// The input width (a weight row's length) must be a multiple of this: a GGUF format
    /// quantizes each row in blocks of this many values.
    pub fn row_multiple(self) -> usize {
        self.ggml().map_or(1, |g| g.block_size())
    }

    /// Bytes of a stored (out, in) weight.
    pub fn bytes(self, out: usize, inp: usize) -> usize {
        match self.ggml() {
            Some(g) => out * inp / g.block_size() * g.type_size(),
            None => out * (inp + DType::F32.size_in_bytes()),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES.iter().find(|(q, _)| q == self).map(|(_, n)| *n);
        f.write_str(name.unwrap_or_default())
    }
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        NAMES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(s))
            .map(|(q, _)| *q)
            .ok_or_else(|| {
                let names: Vec<&str> = NAMES.iter().map(|(_, n)| *n).collect();
                format!(
                    "unknown quantization '{s}': use one of {}",
                    names.join(", ")
                )
            })
    }
}

impl TryFrom<String> for Quantization {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Quantization> for String {
    fn from(q: Quantization) -> String {
        q.to_string()
    }
}

/// The largest finite e4m3 value: each row's scale maps its largest magnitude there.
const FP8_MAX: f64 = 448.0;
/// int8 codes are stored as u8 (candle has no i8) shifted by this.
const INT8_OFFSET: f64 = 128.0;

/// `t` in fresh memory on `device`: moved there, or copied when it is already there.
pub fn copy_to(t: &Tensor, device: &Device) -> Result<Tensor> {
    if t.device().same_device(device) {
        t.copy()
    } else {
        t.to_device(device)
    }
}

/// A quantized (out, in) weight.
#[derive(Debug, Clone)]
pub enum QuantWeight {
    Ggml(Arc<QTensor>),
    /// w ≈ (codes − 128) · scale, codes u8 (out, in), scale f32 (out, 1).
    Int8 {
        codes: Tensor,
        scale: Tensor,
    },
    /// w ≈ codes · scale, codes e4m3 (out, in), scale f32 (out, 1).
    Fp8 {
        codes: Tensor,
        scale: Tensor,
    },
}

impl QuantWeight {
    /// Quantizes `w` (out, in) on its device; `Err` names the width when the format's blocks
    /// do not divide the rows.
    pub fn new(w: &Tensor, q: Quantization) -> std::result::Result<Self, String> {
        let (_, inp) = w.dims2().map_err(|e| e.to_string())?;
        if inp % q.row_multiple() != 0 {
            return Err(format!(
                "{q} quantizes rows in blocks of {} values, but this weight's rows have {inp}",
                q.row_multiple()
            ));
        }
        Self::quantize(w, q).map_err(|e| e.to_string())
    }

    fn quantize(w: &Tensor, q: Quantization) -> Result<Self> {
        if let Some(g) = q.ggml() {
            return Ok(Self::Ggml(Arc::new(QTensor::quantize(w, g)?)));
        }
        let w = w.to_dtype(DType::F32)?;
        let peak = w.abs()?.max_keepdim(D::Minus1)?;
        // An all-zero row keeps a scale of 1 (its codes are zeros either way).
        let peak = peak.maximum(&peak.eq(0.0)?.to_dtype(DType::F32)?)?;
        Ok(match q {
            Quantization::Int8 => {
                let scale = (peak / 127.0)?;
                let codes =
                    (w.broadcast_div(&scale)?.round()? + INT8_OFFSET)?.to_dtype(DType::U8)?;
                Self::Int8 { codes, scale }
            }
            _ => {
                let scale = (peak / FP8_MAX)?;
                let codes = w.broadcast_div(&scale)?.to_dtype(DType::F8E4M3)?;
                Self::Fp8 { codes, scale }
            }
        })
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Ggml(q) => q.device(),
            Self::Int8 { codes, .. } | Self::Fp8 { codes, .. } => codes.device().clone(),
        }
    }

    /// (out_features, in_features).
    pub fn shape(&self) -> (usize, usize) {
        let dims = match self {
            Self::Ggml(q) => q.shape().dims(),
            Self::Int8 { codes, .. } | Self::Fp8 { codes, .. } => codes.dims(),
        };
        (dims[0], dims[1])
    }

    /// Bytes the stored weight takes.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Ggml(q) => q.storage_size_in_bytes(),
            Self::Int8 { codes, scale } | Self::Fp8 { codes, scale } => {
                codes.elem_count() * codes.dtype().size_in_bytes() + scale.elem_count() * 4
            }
        }
    }

    /// A copy in fresh memory on `device` (block swap), bit for bit.
    pub fn copy_to(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            Self::Ggml(q) => Self::Ggml(Arc::new(qtensor_from_ggml(
                q.dtype(),
                &q.data()?,
                q.shape().dims().to_vec(),
                device,
            )?)),
            Self::Int8 { codes, scale } => Self::Int8 {
                codes: copy_to(codes, device)?,
                scale: copy_to(scale, device)?,
            },
            Self::Fp8 { codes, scale } => Self::Fp8 {
                codes: copy_to(codes, device)?,
                scale: copy_to(scale, device)?,
            },
        })
    }

    /// This one weight as a dense (out, in) tensor of `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let w = match self {
            Self::Ggml(q) => q.dequantize(&q.device())?,
            Self::Int8 { codes, scale } => {
                (codes.to_dtype(DType::F32)? - INT8_OFFSET)?.broadcast_mul(scale)?
            }
            Self::Fp8 { codes, scale } => codes.to_dtype(DType::F32)?.broadcast_mul(scale)?,
        };
        w.to_dtype(dtype)
    }

    /// x (..., in) · Wᵀ → (..., out), in x's dtype, without an autograd graph.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // candle's quantized kernels take f32 activations.
            Self::Ggml(q) => x
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(q.as_ref())?
                .to_dtype(x.dtype()),
            _ => super::cpu::matmul(x, &self.dequantize(x.dtype())?.t()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Grads, Linear};
    use candle_core::{Module, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let zeros = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        crate::train::objective::gaussian_like(&zeros, &mut rng).unwrap()
    }

    /// ‖a − b‖ / ‖b‖.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        (norm(&(a - b).unwrap()) / norm(b)).sqrt()
    }

    /// Significant bits of each format's weight values (fp8 e4m3: 3 stored mantissa bits and
    /// the implicit one; the integer codes: their width). A product's relative error is a sum
    /// of independent rounding errors, each well under one code step relative to the row's
    /// (or block's) largest magnitude, so it stays below 2^-(bits-2), a step of a code two
    /// bits shorter; the GGUF kernels also round the activations to 8 bits, within that.
    fn bound(q: Quantization) -> f32 {
        let bits = match q {
            Quantization::Int8 | Quantization::Q8_0 => 8,
            Quantization::Q6K => 6,
            Quantization::Q5K => 5,
            Quantization::Q4K | Quantization::Fp8 => 4,
        };
        2f32.powi(2 - bits)
    }

    /// Forward and input gradient (by hand, and through candle's autograd) of a quantized
    /// Linear against the dense one; every error within the format's bound, and fewer bits
    /// give a larger error.
    #[test]
    fn quantized_linear_matches_the_dense_one_within_its_precision() {
        let (w, b) = (randn(&[64, 512], 1), randn(&[64], 2));
        let (x, dy) = (randn(&[2, 5, 512], 3), randn(&[2, 5, 64], 4));
        let dense = Linear::new(w, Some(b));
        let y = dense.forward_untracked(&x).unwrap();
        let dx = dense.backward(&x, &dy, &mut Grads::default()).unwrap();
        let mut errors = Vec::new();
        for q in Quantization::ALL {
            let mut quantized = dense.clone();
            quantized.quantize(q).unwrap();
            let yq = quantized.forward_untracked(&x).unwrap();
            let dxq = quantized.backward(&x, &dy, &mut Grads::default()).unwrap();
            let (ey, edx) = (rel_err(&yq, &y), rel_err(&dxq, &dx));
            println!("{q}: forward {ey:.2e}, input gradient {edx:.2e}");
            assert!(ey < bound(q) && edx < bound(q), "{q}: {ey} {edx}");
            assert!(ey > 0.0, "{q} changed nothing");

            let xv = Var::from_tensor(&x).unwrap();
            let out = quantized.forward(xv.as_tensor()).unwrap();
            let grads = (&out * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let auto = grads.get(xv.as_tensor()).unwrap();
            assert!(rel_err(&out, &yq) < 1e-6, "{q}: autograd forward differs");
            assert!(
                rel_err(auto, &dxq) < 1e-6,
                "{q}: autograd input gradient differs"
            );
            errors.push((q, ey));
        }
        let err = |q| errors.iter().find(|(e, _)| *e == q).unwrap().1;
        assert!(err(Quantization::Q8_0) < err(Quantization::Q6K));
        assert!(err(Quantization::Q6K) < err(Quantization::Q5K));
        assert!(err(Quantization::Q5K) < err(Quantization::Q4K));
    }

    #[test]
    fn names_parse_and_print_back() {
        for q in Quantization::ALL {
            assert_eq!(q.to_string().parse::<Quantization>(), Ok(q));
        }
        let err = "q3_k".parse::<Quantization>().unwrap_err();
        assert!(err.contains("q3_k") && err.contains("q4_k"), "{err}");
    }

    #[test]
    fn a_k_quant_refuses_rows_its_blocks_do_not_divide() {
        let w = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
        let err = QuantWeight::new(&w, Quantization::Q4K).unwrap_err();
        assert!(err.contains("256") && err.contains("64"), "{err}");
        assert!(QuantWeight::new(&w, Quantization::Q8_0).is_ok());
    }

    #[test]
    fn stored_bytes_match_the_formula() {
        let w = Tensor::ones((8, 256), DType::F32, &Device::Cpu).unwrap();
        for q in Quantization::ALL {
            let stored = QuantWeight::new(&w, q).unwrap();
            assert_eq!(stored.bytes(), q.bytes(8, 256), "{q}");
        }
    }
}
