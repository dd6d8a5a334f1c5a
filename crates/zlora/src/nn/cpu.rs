//! Fused f32 CPU kernels for the passes that need no autograd graph (inference, and training's
//! hand-written backward): one pass over memory where composed candle ops make several, and
//! parallel work items (attention heads, blocks of rows) on rayon's pool, the one candle's
//! matmuls use, instead of a second pool that competes with it for the cores.
//!
//! Each function returns `None` when its inputs are not plain f32 CPU tensors outside any
//! autograd graph; the caller then runs the composed ops (GPUs, bf16, autograd).

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Result, Storage, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Whether every tensor is an f32 CPU tensor that records no graph, and the native kernels
/// are in force ([`super::kernels`]).
fn applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| super::kernels::native_cpu(t.device()) && t.dtype() == DType::F32 && !t.track_op())
}

/// A CPU storage's f32 values.
fn f32_data(storage: &Storage) -> Result<&[f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("a CPU kernel got a tensor on another device")
    };
    cpu.as_slice::<f32>()
}

/// Runs `f` on the contiguous f32 data of the tensors.
fn with_data<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let data = guards
        .iter()
        .map(|(storage, layout)| {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
            Ok(&f32_data(storage)?[start..end])
        })
        .collect::<Result<Vec<&[f32]>>>()?;
    f(&data)
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// A matrix in a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn reaches(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// An output buffer that gemm writes in full before anything reads it: no zeroing pass.
fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit values need no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// A buffer whose every value has been written.
///
/// # Safety
/// Every element of `v` must be initialised.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, length and layout (MaybeUninit<f32> is f32's layout); the
    // caller guarantees the values are initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// dst (m × n, row-major) = scale · a (m × k) · b (k × n), on the calling thread; returns dst,
/// now initialised.
fn gemm_into<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    n: usize,
    a: Mat,
    b: Mat,
    k: usize,
    scale: f32,
) -> &'d mut [f32] {
    gemm_call(dst.as_mut_ptr().cast(), dst.len(), n, a, b, k, scale, false);
    // SAFETY: gemm wrote every element of dst (it reads none when not adding).
    unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// dst += a · b.
fn gemm_add(dst: &mut [f32], n: usize, a: Mat, b: Mat, k: usize) {
    gemm_call(dst.as_mut_ptr(), dst.len(), n, a, b, k, 1.0, true)
}

#[allow(clippy::too_many_arguments)]
fn gemm_call(dst: *mut f32, len: usize, n: usize, a: Mat, b: Mat, k: usize, scale: f32, add: bool) {
    let m = len / n;
    assert!(len == m * n && a.reaches(m, k) && b.reaches(k, n));
    // SAFETY: dst holds len values; the assert keeps every index gemm forms from the sizes
    // and strides in bounds. gemm reads dst only when adding.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            add,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if add { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// A 2-D f32 CPU tensor's data with its strides.
fn mat<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<Mat<'a>> {
    Ok(Mat {
        data: &f32_data(storage)?[layout.start_offset()..],
        rs: layout.stride()[0],
        cs: layout.stride()[1],
    })
}

/// x (..., k) · m (k × n, any strides): see [`matmul_plus`].
pub fn matmul(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    matmul_plus(x, m, &[])
}

/// x · m + Σ u_i · q_i for x (..., k), m (k × n), u_i (..., r_i) and q_i (r_i × n): a Linear
/// with its LoRAs, each low-rank product added into the base product by gemm itself. The rows
/// of x are split evenly over rayon's threads, each part single-threaded gemms: gemm's own
/// threading splits these shapes poorly.
pub fn matmul_plus(x: &Tensor, m: &Tensor, terms: &[(Tensor, Tensor)]) -> Result<Tensor> {
    if let Some(y) = rows_matmul(x, m, terms)? {
        return Ok(y);
    }
    let mut y = x.broadcast_matmul(m)?;
    for (u, q) in terms {
        y = (&y + u.broadcast_matmul(q)?.to_dtype(y.dtype())?)?;
    }
    Ok(y)
}

fn rows_matmul(x: &Tensor, m: &Tensor, terms: &[(Tensor, Tensor)]) -> Result<Option<Tensor>> {
    let rights: Vec<&Tensor> = std::iter::once(m)
        .chain(terms.iter().map(|(_, q)| q))
        .collect();
    let lefts: Vec<&Tensor> = std::iter::once(x)
        .chain(terms.iter().map(|(u, _)| u))
        .collect();
    if !applies(&rights) || !applies(&lefts) || rights.iter().any(|t| t.rank() != 2) {
        return Ok(None);
    }
    let (k, n) = m.dims2()?;
    let rows = x.elem_count() / k;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let inner: Vec<usize> = rights.iter().map(|t| t.dims()[0]).collect();
    let guards: Vec<_> = rights.iter().map(|t| t.storage_and_layout()).collect();
    let mats: Vec<Mat> = guards
        .iter()
        .map(|(s, l)| mat(s, l))
        .collect::<Result<_>>()?;
    with_data(&lefts, |left| {
        let mut out = uninit(rows * n);
        let per = rows.div_ceil(rayon::current_num_threads()).max(1);
        out.par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(i, out)| {
                let part = |t: usize| {
                    let w = inner[t];
                    let end = ((i + 1) * per * w).min(left[t].len());
                    Mat::rows(&left[t][i * per * w..end], w)
                };
                let out = gemm_into(out, n, part(0), mats[0], k, 1.0);
                for t in 1..mats.len() {
                    gemm_add(out, n, part(t), mats[t], inner[t]);
                }
            });
        // SAFETY: the chunks cover `out` and gemm_into wrote each.
        tensor(unsafe { assume_init(out) }, &dims).map(Some)
    })
}

/// Runs `f` compiled for AVX2 and FMA where the CPU has them: the default x86-64 target only
/// vectorises 4 lanes wide, and the loops passed here are written to vectorise.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `avx2` is compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// aᵀ · b for each pair (a (N, m) and b (N, n), contiguous): the pairs run side by side, one
/// single-threaded gemm each (the LoRA factors' gradients, whose shapes are too narrow for
/// gemm's own threading).
pub fn transposed_products(pairs: &[(&Tensor, &Tensor)]) -> Result<Vec<Tensor>> {
    let all: Vec<&Tensor> = pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
    if !applies(&all) || all.iter().any(|t| t.rank() != 2) {
        return pairs.iter().map(|(a, b)| a.t()?.matmul(b)).collect();
    }
    with_data(&all, |data| {
        pairs
            .par_iter()
            .enumerate()
            .map(|(i, (a, b))| {
                let ((rows, m), n) = (a.dims2()?, b.dim(1)?);
                let mut out = uninit(m * n);
                let (left, right) = (Mat::rows(data[2 * i], m).t(), Mat::rows(data[2 * i + 1], n));
                gemm_into(&mut out, n, left, right, rows, 1.0);
                // SAFETY: gemm_into wrote all of `out`.
                tensor(unsafe { assume_init(out) }, &[m, n])
            })
            .collect()
    })
}

/// Lanes of the reductions below: independent accumulators the compiler turns into SIMD.
const LANES: usize = 16;

/// Σ f(a_i, b_i) over equal-length slices, in `LANES` partial sums.
#[inline(always)]
fn reduce(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| f(*x, *y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    reduce(a, b, |x, y| x * y)
}

#[inline(always)]
fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for x in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(x[i]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// 1/√(mean(x²) + eps) of one row.
#[inline(always)]
fn inverse_rms(x: &[f32], eps: f64) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps as f32).sqrt()
}

/// eˣ without branches or library calls, so that loops over it vectorise: 2ⁿ·e^r with
/// n = round(x/ln 2) and Cephes' degree-7 polynomial for e^r (|r| ≤ ln2/2), within 2 ulp;
/// 0 below the smallest normal result (masked scores are −∞) and e⁸⁸ above 88 (the callers
/// take softmax's exp(x ≤ 0) and the sigmoid's 1/(1 + e⁻ᵘ)).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r
        * r)
        + r
        + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Softmax of each row in place.
#[inline(always)]
fn softmax_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_mut(cols) {
        let max = max(row);
        row.iter_mut().for_each(|v| *v = exp(*v - max));
        let inv = 1.0 / reduce(row, row, |x, _| x);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Attention over q, k, v (B, H, S, D) with an optional key mask (B, 1, 1, S): the output
/// (B, H, S, D) and the probabilities (B, H, S, S), one head per work item.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let mut inputs = vec![q, k, v];
    inputs.extend(mask);
    if !applies(&inputs) {
        return Ok(None);
    }
    let (b, h, s, d) = q.dims4()?;
    let scale = 1.0 / (d as f32).sqrt();
    with_data(&inputs, |x| {
        let mut out = uninit(b * h * s * d);
        let mut probs = uninit(b * h * s * s);
        out.par_chunks_mut(s * d)
            .zip(probs.par_chunks_mut(s * s))
            .enumerate()
            .for_each(|(head, (out, p))| {
                let at = |i: usize| &x[i][head * s * d..(head + 1) * s * d];
                let (q, k, v) = (at(0), at(1), at(2));
                let p = gemm_into(p, s, Mat::rows(q, d), Mat::rows(k, d).t(), d, scale);
                if let Some(mask) = x.get(3) {
                    let keys = &mask[(head / h) * s..(head / h + 1) * s];
                    for row in p.chunks_mut(s) {
                        row.iter_mut().zip(keys).for_each(|(v, m)| *v += m);
                    }
                }
                simd(|| softmax_rows(p, s));
                gemm_into(out, d, Mat::rows(p, s), Mat::rows(v, d), s, 1.0);
            });
        // SAFETY: each head's chunks were written by gemm_into.
        let (out, probs) = unsafe { (assume_init(out), assume_init(probs)) };
        Ok(Some((
            tensor(out, &[b, h, s, d])?,
            tensor(probs, &[b, h, s, s])?,
        )))
    })
}

/// The gradients of q, k and v from the saved probabilities and the output gradient (see
/// `nn::attention::attention_backward` for the formulas), one head per work item.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d_out: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !applies(&[q, k, v, probs, d_out]) {
        return Ok(None);
    }
    let (b, h, s, d) = q.dims4()?;
    let scale = 1.0 / (d as f32).sqrt();
    with_data(&[q, k, v, probs, d_out], |x| {
        let n = b * h * s * d;
        let (mut dq, mut dk, mut dv) = (uninit(n), uninit(n), uninit(n));
        dq.par_chunks_mut(s * d)
            .zip(dk.par_chunks_mut(s * d))
            .zip(dv.par_chunks_mut(s * d))
            .enumerate()
            .for_each(|(head, ((dq, dk), dv))| {
                let at = |i: usize| &x[i][head * s * d..(head + 1) * s * d];
                let (q, k, v, g) = (at(0), at(1), at(2), at(4));
                let p = &x[3][head * s * s..(head + 1) * s * s];
                gemm_into(dv, d, Mat::rows(p, s).t(), Mat::rows(g, d), s, 1.0);
                // dS = P ⊙ (dP − Σ dP⊙P) · scale, with dP = dO·vᵀ.
                let mut ds = uninit(s * s);
                let ds = gemm_into(&mut ds, s, Mat::rows(g, d), Mat::rows(v, d).t(), d, 1.0);
                simd(|| {
                    for (row, p) in ds.chunks_mut(s).zip(p.chunks(s)) {
                        let dot = dot(row, p);
                        row.iter_mut()
                            .zip(p)
                            .for_each(|(r, p)| *r = p * (*r - dot) * scale);
                    }
                });
                gemm_into(dq, d, Mat::rows(ds, s), Mat::rows(k, d), s, 1.0);
                gemm_into(dk, d, Mat::rows(ds, s).t(), Mat::rows(q, d), s, 1.0);
            });
        let shape = [b, h, s, d];
        // SAFETY: each head's chunks were written by gemm_into.
        let (dq, dk, dv) = unsafe { (assume_init(dq), assume_init(dk), assume_init(dv)) };
        Ok(Some((
            tensor(dq, &shape)?,
            tensor(dk, &shape)?,
            tensor(dv, &shape)?,
        )))
    })
}

/// Work items of whole rows, about `TARGET` values each.
fn rows_per_item(cols: usize) -> usize {
    const TARGET: usize = 1 << 14;
    (TARGET / cols.max(1)).max(1) * cols.max(1)
}

/// RMSNorm, x·w/√(mean(x²) + eps) per row.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !applies(&[x, w]) {
        return Ok(None);
    }
    let (cols, dims) = (w.elem_count(), x.dims());
    with_data(&[x, w], |t| {
        let (x, w) = (t[0], t[1]);
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_item(cols);
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(out, x)| {
                simd(|| {
                    for (out, x) in out.chunks_mut(cols).zip(x.chunks(cols)) {
                        let r = inverse_rms(x, eps);
                        for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
                            *o = x * r * w;
                        }
                    }
                })
            });
        tensor(out, dims).map(Some)
    })
}

/// RMSNorm's input gradient r·(u − x·r²·mean(u·x)), u = g·w, r = 1/√(mean(x²) + eps), per row.
pub fn rms_norm_input_grad(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !applies(&[x, w, g]) {
        return Ok(None);
    }
    let (cols, dims) = (w.elem_count(), x.dims());
    with_data(&[x, w, g], |t| {
        let (x, w, g) = (t[0], t[1], t[2]);
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_item(cols);
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(out, (x, g))| {
                simd(|| {
                    let rows = out.chunks_mut(cols).zip(x.chunks(cols)).zip(g.chunks(cols));
                    for ((out, x), g) in rows {
                        let r = inverse_rms(x, eps);
                        for ((o, g), w) in out.iter_mut().zip(g).zip(w) {
                            *o = g * w;
                        }
                        let c = r * r * dot(out, x) / cols as f32;
                        for (o, x) in out.iter_mut().zip(x) {
                            *o = r * (*o - x * c);
                        }
                    }
                })
            });
        tensor(out, dims).map(Some)
    })
}

/// z = SiLU(u) ⊙ g.
pub fn swiglu(u: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[u, g]) {
        return Ok(None);
    }
    with_data(&[u, g], |t| {
        let mut z = vec![0f32; t[0].len()];
        let chunk = rows_per_item(1);
        z.par_chunks_mut(chunk)
            .zip(t[0].par_chunks(chunk).zip(t[1].par_chunks(chunk)))
            .for_each(|(z, (u, g))| {
                simd(|| {
                    for ((z, u), g) in z.iter_mut().zip(u).zip(g) {
                        *z = u / (1.0 + exp(-u)) * g;
                    }
                })
            });
        tensor(z, u.dims()).map(Some)
    })
}

/// The gradients of u and g through z = SiLU(u) ⊙ g for dz.
pub fn swiglu_backward(u: &Tensor, g: &Tensor, dz: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    if !applies(&[u, g, dz]) {
        return Ok(None);
    }
    with_data(&[u, g, dz], |t| {
        let n = t[0].len();
        let (mut du, mut dg) = (vec![0f32; n], vec![0f32; n]);
        let chunk = rows_per_item(1);
        du.par_chunks_mut(chunk)
            .zip(dg.par_chunks_mut(chunk))
            .zip(t[0].par_chunks(chunk).zip(t[1].par_chunks(chunk)))
            .zip(t[2].par_chunks(chunk))
            .for_each(|(((du, dg), (u, g)), dz)| {
                simd(|| {
                    let items = du.iter_mut().zip(dg).zip(u).zip(g).zip(dz);
                    for ((((du, dg), u), g), dz) in items {
                        let sig = 1.0 / (1.0 + exp(-u));
                        *dg = dz * u * sig;
                        *du = dz * g * sig * (1.0 + u * (1.0 - sig));
                    }
                })
            });
        Ok(Some((tensor(du, u.dims())?, tensor(dg, u.dims())?)))
    })
}

#[cfg(test)]
mod tests {
    //! Each kernel against the composed ops it replaces (inputs made `Var`s send the callers
    //! down the composed path).
    use super::*;
    use crate::nn::attention::{self, key_padding_mask};
    use crate::nn::{fused, swiglu};
    use candle_core::Var;

    fn randn(shape: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
    }

    fn tracked(t: &Tensor) -> Result<Tensor> {
        Ok(Var::from_tensor(t)?.as_tensor().clone())
    }

    fn assert_close(a: &Tensor, b: &Tensor) -> Result<()> {
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        assert!(err / scale < 1e-5, "differs by {err} (scale {scale})");
        Ok(())
    }

    #[test]
    fn attention_and_its_backward_equal_the_composed_ops() -> Result<()> {
        let shape = [2, 3, 7, 8];
        let (q, k, v, g) = (
            randn(&shape)?,
            randn(&shape)?,
            randn(&shape)?,
            randn(&shape)?,
        );
        let mask = key_padding_mask(&[7, 4], 7, &Device::Cpu)?;
        let (out, probs) = attention(&q, &k, &v, mask.as_ref())?.expect("the CPU kernel");
        let (want_out, want_probs) = attention::attention(&tracked(&q)?, &k, &v, mask.as_ref())?;
        assert_close(&out, &want_out)?;
        assert_close(&probs, &want_probs.expect("kept"))?;
        let got = attention_backward(&q, &k, &v, &probs, &g)?.expect("the CPU kernel");
        let want = attention::attention_backward(&tracked(&q)?, &k, &v, Some(&probs), None, &g)?;
        for (a, b) in [(got.0, want.0), (got.1, want.1), (got.2, want.2)] {
            assert_close(&a, &b)?;
        }
        Ok(())
    }

    #[test]
    fn rms_norm_equals_candles_kernel() -> Result<()> {
        let (x, w) = (randn(&[3, 5, 16])?, randn(&[16])?);
        let got = rms_norm(&x, &w, 1e-5)?.expect("the CPU kernel");
        assert_close(&got, &candle_nn::ops::rms_norm(&x, &w, 1e-5)?)
    }

    #[test]
    fn rms_norm_input_grad_equals_the_composed_ops() -> Result<()> {
        let (x, w, g) = (randn(&[3, 5, 16])?, randn(&[16])?, randn(&[3, 5, 16])?);
        let got = rms_norm_input_grad(&x, &w, &g, 1e-5)?.expect("the CPU kernel");
        assert_close(
            &got,
            &fused::rms_norm_input_grad(&tracked(&x)?, &w, &g, 1e-5)?,
        )
    }

    #[test]
    fn swiglu_and_its_backward_equal_the_composed_ops() -> Result<()> {
        let (u, g, dz) = (randn(&[4, 9])?, randn(&[4, 9])?, randn(&[4, 9])?);
        let z = swiglu(&u, &g)?.expect("the CPU kernel");
        assert_close(&z, &swiglu::swiglu(&tracked(&u)?, &g)?)?;
        let (du, dg) = swiglu_backward(&u, &g, &dz)?.expect("the CPU kernel");
        let (want_du, want_dg) = swiglu::swiglu_backward(&tracked(&u)?, &g, &dz)?;
        assert_close(&du, &want_du)?;
        assert_close(&dg, &want_dg)
    }

    #[test]
    fn exp_is_within_2_ulp_and_zero_for_minus_infinity() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0 + 0.003;
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, not {want}"
            );
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn tracked_bf16_and_strided_inputs_are_handled() -> Result<()> {
        let x = randn(&[4, 6])?;
        assert!(swiglu(&tracked(&x)?, &x)?.is_none());
        assert!(swiglu(&x.to_dtype(DType::BF16)?, &x.to_dtype(DType::BF16)?)?.is_none());
        let t = x.t()?;
        let z = swiglu(&t, &t)?.expect("the CPU kernel");
        assert_close(&z, &swiglu::swiglu(&tracked(&t)?, &t)?)
    }
}
