//! Adapters that a [`super::Linear`] adds to its output: LoRA, LoKr and LoHa.
//!
//! Each kind keeps its own factors (so training can make them `Var`s and inference never
//! materialises more than it must) and defines its dense weight delta as LyCORIS does:
//!
//! | kind | factors | delta (before `scale · strength`) |
//! |---|---|---|
//! | LoRA | down A [r, in], up B [out, r] | B · A |
//! | LoKr | w1 [l, m], w2 [k, n] (each full or a product a·b) | kron(w1, w2), out = l·k, in = m·n |
//! | LoHa | w1 = w1a·w1b, w2 = w2a·w2b, both [out, in] | w1 ⊙ w2 |
//!
//! Everything is composed of candle ops that have a backward pass.

use candle_core::{DType, Device, Result, Tensor};

use super::cpu::{matmul, transposed_products};
use super::grads::Grads;

/// One factor of a LoKr or LoHa adapter.
#[derive(Debug, Clone)]
pub enum Factor {
    /// A matrix stored as it is (LyCORIS `lokr_w1`, `lokr_w2`).
    Full(Tensor),
    /// `a · b` with a [rows, rank] and b [rank, cols] (`lokr_w1_a`/`_b`, `hada_w1_a`/`_b`).
    Product(Tensor, Tensor),
}

impl Factor {
    /// (rows, cols), after checking that the two halves of a product agree on the rank.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Factor::Full(m) => m.dims2(),
            Factor::Product(a, b) => {
                let ((rows, ra), (rb, cols)) = (a.dims2()?, b.dims2()?);
                if ra != rb {
                    candle_core::bail!(
                        "factor halves [{rows}, {ra}] and [{rb}, {cols}] differ in rank"
                    );
                }
                Ok((rows, cols))
            }
        }
    }

    /// The rank of a product, `None` for a full matrix.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Factor::Full(_) => None,
            Factor::Product(_, b) => b.dims().first().copied(),
        }
    }

    /// The factor as one f32 matrix.
    pub fn matrix(&self) -> Result<Tensor> {
        match self {
            Factor::Full(m) => m.to_dtype(DType::F32),
            Factor::Product(a, b) => a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?),
        }
    }

    /// The factor with its rows `[start, start + len)` (for a product: rows of `a`).
    fn rows(&self, start: usize, len: usize) -> Result<Factor> {
        Ok(match self {
            Factor::Full(m) => Factor::Full(m.narrow(0, start, len)?),
            Factor::Product(a, b) => Factor::Product(a.narrow(0, start, len)?, b.clone()),
        })
    }

    /// The factor times `s` (folded into the full matrix or into `a`).
    pub fn scaled(&self, s: f64) -> Result<Factor> {
        Ok(match self {
            Factor::Full(m) => Factor::Full((m * s)?),
            Factor::Product(a, b) => Factor::Product((a * s)?, b.clone()),
        })
    }
}

/// The factors of one adapter and the rule that combines them.
#[derive(Debug, Clone)]
pub enum AdapterWeights {
    /// LoRA: down (A) [rank, in], up (B) [out, rank].
    LowRank { down: Tensor, up: Tensor },
    /// LyCORIS LoKr: kron(w1, w2).
    Kronecker { w1: Factor, w2: Factor },
    /// LyCORIS LoHa: w1 ⊙ w2 (both products in every producer).
    Hadamard { w1: Factor, w2: Factor },
}

impl AdapterWeights {
    /// "LoRA", "LoKr" or "LoHa".
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterWeights::LowRank { .. } => "LoRA",
            AdapterWeights::Kronecker { .. } => "LoKr",
            AdapterWeights::Hadamard { .. } => "LoHa",
        }
    }

    /// (out_features, in_features) of the Linear this adapts; an error for factors whose
    /// shapes do not compose.
    pub fn shape(&self) -> Result<(usize, usize)> {
        match self {
            AdapterWeights::LowRank { down, up } => {
                let ((r_down, inp), (out, r_up)) = (down.dims2()?, up.dims2()?);
                if r_down != r_up {
                    candle_core::bail!(
                        "LoRA down [{r_down}, {inp}] and up [{out}, {r_up}] differ in rank"
                    );
                }
                Ok((out, inp))
            }
            AdapterWeights::Kronecker { w1, w2 } => {
                let ((l, m), (k, n)) = (w1.dims()?, w2.dims()?);
                Ok((l * k, m * n))
            }
            AdapterWeights::Hadamard { w1, w2 } => {
                let (s1, s2) = (w1.dims()?, w2.dims()?);
                if s1 != s2 {
                    candle_core::bail!("LoHa products {s1:?} and {s2:?} differ in shape");
                }
                Ok(s1)
            }
        }
    }

    /// The rank the producer's alpha is divided by, as LyCORIS and ComfyUI define it: the
    /// LoRA rank, the LoHa rank of w1, the LoKr rank of the decomposed factor (w2 first);
    /// `None` for a LoKr whose factors are both full (its scale is 1 whatever alpha says).
    pub fn alpha_rank(&self) -> Option<usize> {
        match self {
            AdapterWeights::LowRank { down, .. } => down.dims().first().copied(),
            AdapterWeights::Kronecker { w1, w2 } => w2.rank().or(w1.rank()),
            AdapterWeights::Hadamard { w1, .. } => w1.rank(),
        }
    }

    /// The dense delta (without scale or strength), f32 [out, in].
    pub fn delta(&self) -> Result<Tensor> {
        match self {
            AdapterWeights::LowRank { down, up } => {
                up.to_dtype(DType::F32)?.matmul(&down.to_dtype(DType::F32)?)
            }
            AdapterWeights::Kronecker { w1, w2 } => kron(&w1.matrix()?, &w2.matrix()?),
            AdapterWeights::Hadamard { w1, w2 } => w1.matrix()? * w2.matrix()?,
        }
    }

    /// Every tensor of the factors.
    pub fn tensors(&self) -> Vec<&Tensor> {
        fn factor(f: &Factor) -> Vec<&Tensor> {
            match f {
                Factor::Full(m) => vec![m],
                Factor::Product(a, b) => vec![a, b],
            }
        }
        match self {
            AdapterWeights::LowRank { down, up } => vec![down, up],
            AdapterWeights::Kronecker { w1, w2 } | AdapterWeights::Hadamard { w1, w2 } => {
                [factor(w1), factor(w2)].concat()
            }
        }
    }

    /// The same factors with every tensor mapped by `f`.
    pub(crate) fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<AdapterWeights> {
        let factor = |x: &Factor| -> Result<Factor> {
            Ok(match x {
                Factor::Full(m) => Factor::Full(f(m)?),
                Factor::Product(a, b) => Factor::Product(f(a)?, f(b)?),
            })
        };
        Ok(match self {
            AdapterWeights::LowRank { down, up } => AdapterWeights::LowRank {
                down: f(down)?,
                up: f(up)?,
            },
            AdapterWeights::Kronecker { w1, w2 } => AdapterWeights::Kronecker {
                w1: factor(w1)?,
                w2: factor(w2)?,
            },
            AdapterWeights::Hadamard { w1, w2 } => AdapterWeights::Hadamard {
                w1: factor(w1)?,
                w2: factor(w2)?,
            },
        })
    }

    /// The factors on `device` in `dtype` (how a file's adapter enters a model).
    pub fn placed(&self, device: &Device, dtype: DType) -> Result<AdapterWeights> {
        self.map(|t| t.to_device(device)?.to_dtype(dtype))
    }

    /// A copy of the factors with storage of their own (a snapshot of trained `Var`s).
    pub fn copied(&self) -> Result<AdapterWeights> {
        self.map(|t| t.copy())
    }

    /// The same factors, cut from any autograd graph.
    fn detached(&self) -> Result<AdapterWeights> {
        self.map(|t| Ok(t.detach()))
    }

    /// `x · deltaᵀ` for x [..., in] in the adapter's dtype (f32).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            AdapterWeights::LowRank { down, up } => {
                let x = x.to_dtype(down.dtype())?;
                matmul(&matmul(&x, &down.t()?)?, &up.t()?)
            }
            // kron(w1, w2) · vec(X) = vec(w1 · X · w2ᵀ) with X the input viewed as [m, n]:
            // two small matmuls instead of an [out, in] matrix.
            AdapterWeights::Kronecker { w1, w2 } => {
                let (w1, w2) = (w1.matrix()?, w2.matrix()?);
                let ((l, m), (k, n)) = (w1.dims2()?, w2.dims2()?);
                let dims = x.dims();
                let lead = &dims[..dims.len().saturating_sub(1)];
                let rows: usize = lead.iter().product();
                let xs = x.to_dtype(DType::F32)?.reshape((rows, m, n))?;
                let y = w1.broadcast_matmul(&xs.broadcast_matmul(&w2.t()?)?)?;
                let mut out = lead.to_vec();
                out.push(l * k);
                y.reshape(out)
            }
            AdapterWeights::Hadamard { .. } => x
                .to_dtype(DType::F32)?
                .broadcast_matmul(&self.delta()?.t()?),
        }
    }

    /// `n` adapters for `n` equal row blocks of this one, exactly: LoRA shares down and
    /// splits up, LoKr splits w1's rows (when `n` divides them), LoHa splits both products.
    /// Used to take ComfyUI's fused `attention.qkv` apart.
    pub fn split_rows(&self, n: usize) -> Result<Vec<AdapterWeights>> {
        let (out, _) = self.shape()?;
        let outer = match self {
            AdapterWeights::Kronecker { w1, .. } => w1.dims()?.0,
            _ => out,
        };
        if n == 0 || outer % n != 0 {
            candle_core::bail!(
                "{} with {outer} outer rows cannot be split exactly into {n} blocks",
                self.kind()
            );
        }
        let len = outer / n;
        (0..n)
            .map(|i| {
                let start = i * len;
                Ok(match self {
                    AdapterWeights::LowRank { down, up } => AdapterWeights::LowRank {
                        down: down.clone(),
                        up: up.narrow(0, start, len)?,
                    },
                    AdapterWeights::Kronecker { w1, w2 } => AdapterWeights::Kronecker {
                        w1: w1.rows(start, len)?,
                        w2: w2.clone(),
                    },
                    AdapterWeights::Hadamard { w1, w2 } => AdapterWeights::Hadamard {
                        w1: w1.rows(start, len)?,
                        w2: w2.rows(start, len)?,
                    },
                })
            })
            .collect()
    }
}

/// Adds the gradients of a factor's `Var`s for the gradient `dm` of its matrix.
fn factor_grads(factor: &Factor, dm: Tensor, grads: &mut Grads) -> Result<()> {
    match factor {
        Factor::Full(m) if m.is_variable() => grads.add(m, dm),
        Factor::Full(_) => Ok(()),
        Factor::Product(a, b) => {
            if a.is_variable() {
                grads.add(a, dm.matmul(&b.detach().t()?)?)?;
            }
            if b.is_variable() {
                grads.add(b, a.detach().t()?.matmul(&dm)?)?;
            }
            Ok(())
        }
    }
}

/// kron(a, b) for matrices: [l, m] ⊗ [k, n] → [l·k, m·n], differentiable.
pub fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ((l, m), (k, n)) = (a.dims2()?, b.dims2()?);
    let a4 = a.reshape((l, 1, m, 1))?;
    let b4 = b.reshape((1, k, 1, n))?;
    a4.broadcast_mul(&b4)?.reshape((l * k, m * n))
}

/// One adapter on one Linear: `delta_W = strength · scale · weights.delta()`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Which file or run this adapter came from (for messages and for switching it off).
    pub name: String,
    pub weights: AdapterWeights,
    /// The producer's alpha / rank (1 when alpha was folded in).
    pub scale: f64,
    /// The user's strength (1.0 = as trained).
    pub strength: f64,
    pub enabled: bool,
}

impl Adapter {
    fn factor(&self) -> f64 {
        self.scale * self.strength
    }

    /// The dense weight delta this adapter adds, in f32 ([out, in]).
    pub fn delta(&self) -> Result<Tensor> {
        self.weights.delta()? * self.factor()
    }

    /// What this adapter adds to the Linear's output for input `x`, in `x`'s dtype.
    /// Adapters compute in their own dtype: the model's compute dtype for a file's adapter,
    /// f32 for the LoRA being trained (its master weights).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        (self.weights.apply(x)? * self.factor())?.to_dtype(x.dtype())
    }

    /// Whether any factor is a `Var` (the adapter being trained).
    pub fn is_trainable(&self) -> bool {
        self.weights.tensors().iter().any(|t| t.is_variable())
    }

    /// `forward` without recording an autograd graph, for passes whose backward is written
    /// by hand ([`super::Linear::backward`]).
    pub(crate) fn forward_untracked(&self, x: &Tensor) -> Result<Tensor> {
        (self.weights.detached()?.apply(x)? * self.factor())?.to_dtype(x.dtype())
    }

    /// A LoRA's factors (A, B) and f = scale · strength, cut from any autograd graph; `None`
    /// for LoKr and LoHa.
    pub(crate) fn low_rank(&self) -> Option<(Tensor, Tensor, f64)> {
        match &self.weights {
            AdapterWeights::LowRank { down, up } => {
                Some((down.detach(), up.detach(), self.factor()))
            }
            _ => None,
        }
    }

    /// The backward of a LoRA for the output gradient `dy`: factors that are `Var`s (the
    /// LoRA being trained) add their gradients to `grads`, and the input's gradient is
    /// d·A for the returned d = f·dy·B and A. With u = x·Aᵀ and y = f·u·Bᵀ: ∂B = f·dyᵀ·u,
    /// ∂A = dᵀ·x. `None` for LoKr and LoHa (see [`Adapter::dense_backward`]).
    pub(crate) fn low_rank_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (AdapterWeights::LowRank { down, up }, Some((a, b, f))) =
            (&self.weights, self.low_rank())
        else {
            return Ok(None);
        };
        let dy = dy.to_dtype(DType::F32)?;
        let d = (matmul(&dy, &b)? * f)?;
        if self.is_trainable() {
            let rows = |t: &Tensor| -> Result<Tensor> {
                let w = t.dim(candle_core::D::Minus1)?;
                t.reshape((t.elem_count() / w, w))
            };
            let x2 = rows(&x.to_dtype(DType::F32)?)?;
            let (dy2, d2, u) = (rows(&dy)?, rows(&d)?, matmul(&x2, &a.t()?)?);
            let [d_up, d_down]: [Tensor; 2] = transposed_products(&[(&dy2, &u), (&d2, &x2)])?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("two products expected".into()))?;
            if up.is_variable() {
                grads.add(up, (d_up * f)?)?;
            }
            if down.is_variable() {
                grads.add(down, d_down)?;
            }
        }
        Ok(Some((d, a)))
    }

    /// The input's gradient through a LoKr's or LoHa's dense delta, in `x`'s dtype.
    pub(crate) fn dense_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let delta = (self.weights.detached()?.delta()? * self.factor())?;
        dy.to_dtype(DType::F32)?
            .broadcast_matmul(&delta)?
            .to_dtype(x.dtype())
    }

    /// The gradients of a trainable LoKr's or LoHa's factors for the output gradient `dy`,
    /// added to `grads` (nothing for a frozen adapter or a LoRA, whose backward is
    /// [`Adapter::low_rank_backward`]). They go through the dense delta: its gradient
    /// dW = f·dyᵀ·x ([out, in], f32), then the chain rule into the factors. This is exact and
    /// costs one [out, in] product over the rows, the size of the frozen weight's own input
    /// gradient. With W = kron(w1, w2), dW viewed as G[i, j, p, q] (row i·k + j, column
    /// p·n + q): ∂w1[i, p] = Σ G[i, j, p, q]·w2[j, q] and ∂w2[j, q] = Σ G[i, j, p, q]·w1[i, p].
    /// With W = w1 ⊙ w2: ∂w1 = dW ⊙ w2, ∂w2 = dW ⊙ w1. A product a·b then takes
    /// ∂a = ∂M·bᵀ, ∂b = aᵀ·∂M.
    pub(crate) fn dense_factor_grads(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<()> {
        if !self.is_trainable() {
            return Ok(());
        }
        let rows = |t: &Tensor| -> Result<Tensor> {
            let w = t.dim(candle_core::D::Minus1)?;
            t.to_dtype(DType::F32)?.reshape((t.elem_count() / w, w))
        };
        let dw = (rows(dy)?.t()?.matmul(&rows(x)?)? * self.factor())?;
        let fixed = self.weights.detached()?;
        let (w1, w2) = match (&self.weights, &fixed) {
            (
                AdapterWeights::Kronecker { w1, w2 },
                AdapterWeights::Kronecker { w1: m1, w2: m2 },
            ) => {
                let (m1, m2) = (m1.matrix()?, m2.matrix()?);
                let ((l, m), (k, n)) = (m1.dims2()?, m2.dims2()?);
                let g = dw
                    .reshape((l, k, m, n))?
                    .permute((0, 2, 1, 3))?
                    .contiguous()?
                    .reshape((l * m, k * n))?;
                let d1 = g.matmul(&m2.reshape((k * n, 1))?)?.reshape((l, m))?;
                let d2 = m1.reshape((1, l * m))?.matmul(&g)?.reshape((k, n))?;
                ((w1, d1), (w2, d2))
            }
            (AdapterWeights::Hadamard { w1, w2 }, AdapterWeights::Hadamard { w1: m1, w2: m2 }) => {
                let (m1, m2) = (m1.matrix()?, m2.matrix()?);
                ((w1, (&dw * m2)?), (w2, (&dw * m1)?))
            }
            _ => return Ok(()),
        };
        factor_grads(w1.0, w1.1, grads)?;
        factor_grads(w2.0, w2.1, grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn m(rows: usize, cols: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn kron_matches_its_definition() {
        let (a, b) = (m(2, 3, 0.0), m(4, 5, 1.0));
        let k = kron(&a, &b).unwrap();
        let (av, bv, kv) = (
            a.to_vec2::<f32>().unwrap(),
            b.to_vec2::<f32>().unwrap(),
            k.to_vec2::<f32>().unwrap(),
        );
        for (i, j, p, q) in [(0, 0, 0, 0), (1, 3, 2, 4), (1, 0, 0, 2), (0, 2, 1, 3)] {
            assert_eq!(kv[i * 4 + j][p * 5 + q], av[i][p] * bv[j][q]);
        }
    }

    /// Every kind's fast forward equals x · deltaᵀ, and splitting rows is exact.
    #[test]
    fn forward_and_split_agree_with_the_dense_delta() {
        let kinds = [
            AdapterWeights::LowRank {
                down: m(3, 12, 0.0),
                up: m(6, 3, 1.0),
            },
            AdapterWeights::Kronecker {
                w1: Factor::Full(m(3, 4, 2.0)),
                w2: Factor::Product(m(2, 1, 3.0), m(1, 3, 4.0)),
            },
            AdapterWeights::Hadamard {
                w1: Factor::Product(m(6, 2, 5.0), m(2, 12, 6.0)),
                w2: Factor::Product(m(6, 2, 7.0), m(2, 12, 8.0)),
            },
        ];
        let x = Tensor::randn(0f32, 1.0, (2, 5, 12), &Device::Cpu).unwrap();
        for w in kinds {
            assert_eq!(w.shape().unwrap(), (6, 12), "{}", w.kind());
            let delta = w.delta().unwrap();
            let dense = x.broadcast_matmul(&delta.t().unwrap()).unwrap();
            assert!(
                max_diff(&w.apply(&x).unwrap(), &dense) < 1e-5,
                "{}",
                w.kind()
            );
            let parts = w.split_rows(3).unwrap();
            for (i, p) in parts.iter().enumerate() {
                let want = delta.narrow(0, 2 * i, 2).unwrap();
                assert!(max_diff(&p.delta().unwrap(), &want) < 1e-6, "{}", w.kind());
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let lora = AdapterWeights::LowRank {
            down: m(3, 4, 0.0),
            up: m(4, 2, 0.0),
        };
        assert!(lora.shape().is_err());
        let loha = AdapterWeights::Hadamard {
            w1: Factor::Product(m(4, 2, 0.0), m(2, 4, 0.0)),
            w2: Factor::Product(m(4, 2, 0.0), m(2, 5, 0.0)),
        };
        assert!(loha.shape().is_err());
        let lokr = AdapterWeights::Kronecker {
            w1: Factor::Full(m(2, 2, 0.0)),
            w2: Factor::Full(m(3, 3, 0.0)),
        };
        assert!(lokr.split_rows(3).is_err());
    }
}
