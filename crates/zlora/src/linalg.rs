//! The small amount of dense linear algebra LoRA tools need, in f64: thin QR, SVD, the SVD
//! of a low-rank product, and a randomized truncated SVD of a large matrix. candle has none
//! of these.
//!
//! * [`qr`]: Householder reflections (backward stable; rank-deficient inputs are fine).
//! * [`svd`]: one-sided Jacobi (Hestenes). Accurate to a few ulps relative to the largest
//!   singular value, O(m·n²) per sweep: meant for the small matrices below, not [3840, 10240].
//! * [`svd_of_product`]: the SVD of `up · down` (a LoRA delta, or a rank concatenation of
//!   several) from the QR of both factors and the Jacobi SVD of the small core, without
//!   forming the [out, in] product.
//! * [`randomized_svd`]: Halko–Martinsson–Tropp range finder with power iterations (the large
//!   matmuls run in candle, in f64), then [`svd_of_product`] of `Q · (Qᵀ W)`. When the
//!   sketch width `rank + oversample` reaches min(out, in), or the matrix has rank at most the
//!   sketch width, the range is captured exactly and the result is exact to rounding; for a
//!   full-rank matrix the truncation is near-optimal (two power iterations make the excess
//!   error small unless the spectrum is flat). The returned factors are always an orthogonal
//!   projection of W, so the energy they report is exact for what is returned.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// A dense row-major f64 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn identity(n: usize) -> Self {
        let mut m = Mat::zeros(n, n);
        for i in 0..n {
            m[(i, i)] = 1.0;
        }
        m
    }

    /// A 2-D tensor of any float dtype, as f64.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(Mat { rows, cols, data })
    }

    /// An f32 CPU tensor.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let t = Tensor::from_slice(&self.data, (self.rows, self.cols), &Device::Cpu)?;
        Ok(t.to_dtype(DType::F32)?)
    }

    fn to_tensor_f64(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (self.rows, self.cols),
            &Device::Cpu,
        )?)
    }

    pub fn transpose(&self) -> Mat {
        let mut t = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t[(j, i)] = self[(i, j)];
            }
        }
        t
    }

    pub fn matmul(&self, other: &Mat) -> Mat {
        debug_assert_eq!(self.cols, other.rows, "matmul inner dimensions");
        let mut out = Mat::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self[(i, k)];
                if a == 0.0 {
                    continue;
                }
                let row = &other.data[k * other.cols..(k + 1) * other.cols];
                let dst = &mut out.data[i * other.cols..(i + 1) * other.cols];
                for (d, b) in dst.iter_mut().zip(row) {
                    *d += a * b;
                }
            }
        }
        out
    }

    /// The first `n` columns.
    pub fn first_cols(&self, n: usize) -> Mat {
        let n = n.min(self.cols);
        let mut out = Mat::zeros(self.rows, n);
        for i in 0..self.rows {
            out.data[i * n..(i + 1) * n]
                .copy_from_slice(&self.data[i * self.cols..i * self.cols + n]);
        }
        out
    }

    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum::<f64>().sqrt()
    }
}

impl std::ops::Index<(usize, usize)> for Mat {
    type Output = f64;
    fn index(&self, (i, j): (usize, usize)) -> &f64 {
        &self.data[i * self.cols + j]
    }
}

impl std::ops::IndexMut<(usize, usize)> for Mat {
    fn index_mut(&mut self, (i, j): (usize, usize)) -> &mut f64 {
        &mut self.data[i * self.cols + j]
    }
}

/// Thin QR of `a` [m, n]: Q [m, k] with orthonormal columns and R [k, n] upper triangular,
/// k = min(m, n), by Householder reflections.
pub fn qr(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    let k = m.min(n);
    let mut r = a.clone();
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        let mut v: Vec<f64> = (j..m).map(|i| r[(i, j)]).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            reflectors.push(Vec::new());
            continue;
        }
        // Adding the sign of v[0] avoids cancellation.
        v[0] += norm.copysign(v[0]);
        let vnorm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= vnorm);
        for c in j..n {
            let dot: f64 = (j..m).map(|i| v[i - j] * r[(i, c)]).sum();
            for i in j..m {
                r[(i, c)] -= 2.0 * v[i - j] * dot;
            }
        }
        reflectors.push(v);
    }
    // Q = H_0 · H_1 ⋯ H_{k-1} · [I_k; 0], applied from the last reflector back.
    let mut q = Mat::zeros(m, k);
    for i in 0..k {
        q[(i, i)] = 1.0;
    }
    for (j, v) in reflectors.iter().enumerate().rev() {
        if v.is_empty() {
            continue;
        }
        for c in 0..k {
            let dot: f64 = (j..m).map(|i| v[i - j] * q[(i, c)]).sum();
            for i in j..m {
                q[(i, c)] -= 2.0 * v[i - j] * dot;
            }
        }
    }
    let mut upper = Mat::zeros(k, n);
    for i in 0..k {
        for c in i..n {
            upper[(i, c)] = r[(i, c)];
        }
    }
    (q, upper)
}

/// A (thin) singular value decomposition `A = U · diag(s) · Vᵀ`, s descending. Columns of
/// U for zero singular values are zero (they never contribute to a reconstruction).
#[derive(Debug, Clone)]
pub struct Svd {
    /// [m, k]
    pub u: Mat,
    /// k values, descending, ≥ 0.
    pub s: Vec<f64>,
    /// [n, k]
    pub v: Mat,
}

impl Svd {
    /// Sum of all squared singular values (= ‖A‖²_F).
    pub fn energy(&self) -> f64 {
        self.s.iter().map(|s| s * s).sum()
    }

    /// Squared singular values kept by a rank-`r` truncation.
    pub fn energy_kept(&self, r: usize) -> f64 {
        self.s.iter().take(r).map(|s| s * s).sum()
    }

    /// The best rank-`r` approximation as LoRA factors (up [m, r], down [r, n]), with
    /// sqrt(s) on each side so neither factor's magnitude dwarfs the other's.
    pub fn truncate(&self, r: usize) -> (Mat, Mat) {
        let r = r.min(self.s.len());
        let mut up = self.u.first_cols(r);
        let mut down = self.v.first_cols(r).transpose();
        for (j, s) in self.s.iter().take(r).enumerate() {
            let root = s.sqrt();
            for i in 0..up.rows {
                up[(i, j)] *= root;
            }
            for c in 0..down.cols {
                down[(j, c)] *= root;
            }
        }
        (up, down)
    }
}

/// Largest number of Jacobi sweeps; convergence is quadratic, real inputs need < 15.
const MAX_SWEEPS: usize = 60;

/// SVD of `a` [m, n] by one-sided Jacobi rotations; k = min(m, n).
pub fn svd(a: &Mat) -> Svd {
    if a.rows < a.cols {
        let t = svd(&a.transpose());
        return Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        };
    }
    // Rows of `cols` are the columns of A (contiguous), rows of `v` the columns of V.
    let (m, n) = (a.rows, a.cols);
    let mut cols = a.transpose();
    let mut v = Mat::identity(n);
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                rotated |= rotate(&mut cols, &mut v, p, q);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = (0..n).map(|j| (row_dot(&cols, j, j).sqrt(), j)).collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut out = Svd {
        u: Mat::zeros(m, n),
        s: Vec::with_capacity(n),
        v: Mat::zeros(n, n),
    };
    for (k, &(s, j)) in order.iter().enumerate() {
        out.s.push(s);
        for i in 0..m {
            out.u[(i, k)] = if s > 0.0 { cols[(j, i)] / s } else { 0.0 };
        }
        for i in 0..n {
            out.v[(i, k)] = v[(j, i)];
        }
    }
    out
}

fn row_dot(m: &Mat, a: usize, b: usize) -> f64 {
    let w = m.cols;
    m.data[a * w..(a + 1) * w]
        .iter()
        .zip(&m.data[b * w..(b + 1) * w])
        .map(|(x, y)| x * y)
        .sum()
}

/// One Jacobi rotation making columns p and q orthogonal; false when they already are.
fn rotate(cols: &mut Mat, v: &mut Mat, p: usize, q: usize) -> bool {
    let (alpha, beta, gamma) = (
        row_dot(cols, p, p),
        row_dot(cols, q, q),
        row_dot(cols, p, q),
    );
    if gamma == 0.0 || gamma.abs() <= f64::EPSILON * (alpha * beta).sqrt() {
        return false;
    }
    let zeta = (beta - alpha) / (2.0 * gamma);
    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
    let c = 1.0 / (1.0 + t * t).sqrt();
    let s = c * t;
    for m in [cols, v] {
        let w = m.cols;
        for i in 0..w {
            let (x, y) = (m.data[p * w + i], m.data[q * w + i]);
            m.data[p * w + i] = c * x - s * y;
            m.data[q * w + i] = s * x + c * y;
        }
    }
    true
}

/// SVD of `up · down` (up [m, r], down [r, n]) without forming the product: QR of up and
/// downᵀ, Jacobi SVD of the small core R_up · R_downᵀ.
pub fn svd_of_product(up: &Mat, down: &Mat) -> Svd {
    let (qu, ru) = qr(up);
    let (qd, rd) = qr(&down.transpose());
    let core = svd(&ru.matmul(&rd.transpose()));
    Svd {
        u: qu.matmul(&core.u),
        s: core.s,
        v: qd.matmul(&core.v),
    }
}

/// Rank-`rank` truncated SVD of the dense matrix `w` [m, n] (see the module documentation):
/// sketch width `rank + oversample`, `power_iters` power iterations, Gaussian test matrix
/// from `seed`. Returns at most `rank + oversample` components.
pub fn randomized_svd(
    w: &Tensor,
    rank: usize,
    oversample: usize,
    power_iters: usize,
    seed: u64,
) -> Result<Svd> {
    let w = w.to_dtype(DType::F64)?;
    let (m, n) = w.dims2()?;
    let k = (rank + oversample).min(m).min(n).max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let omega = Mat {
        rows: n,
        cols: k,
        data: (0..n * k)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect(),
    };
    let mut q = orthonormal(&w.matmul(&omega.to_tensor_f64()?)?)?;
    let wt = w.t()?;
    for _ in 0..power_iters {
        let z = orthonormal(&wt.matmul(&q.to_tensor_f64()?)?)?;
        q = orthonormal(&w.matmul(&z.to_tensor_f64()?)?)?;
    }
    // W ≈ Q · (Qᵀ W), where (Qᵀ W) = (Wᵀ Q)ᵀ.
    let b = Mat::from_tensor(&wt.matmul(&q.to_tensor_f64()?)?)?.transpose();
    Ok(svd_of_product(&q, &b))
}

/// A seed for [`randomized_svd`] derived from a name (FNV-1a), so a module's result does not
/// depend on the order modules are processed in.
pub fn seed_for(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn orthonormal(t: &Tensor) -> Result<Mat> {
    Ok(qr(&Mat::from_tensor(t)?).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(rows: usize, cols: usize, v: &[f64]) -> Mat {
        Mat {
            rows,
            cols,
            data: v.to_vec(),
        }
    }

    fn pseudo_random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Mat {
            rows,
            cols,
            data: (0..rows * cols)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect(),
        }
    }

    fn max_abs_diff(a: &Mat, b: &Mat) -> f64 {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn reconstruct(s: &Svd) -> Mat {
        let mut us = s.u.clone();
        for i in 0..us.rows {
            for (j, sv) in s.s.iter().enumerate() {
                us[(i, j)] *= sv;
            }
        }
        us.matmul(&s.v.transpose())
    }

    fn assert_orthonormal_cols(q: &Mat, tol: f64) {
        let g = q.transpose().matmul(q);
        assert!(max_abs_diff(&g, &Mat::identity(q.cols)) < tol, "{g:?}");
    }

    #[test]
    fn svd_of_a_known_2x2() {
        // [[3, 0], [4, 5]] has singular values 3·√5 and √5.
        let s = svd(&mat(2, 2, &[3.0, 0.0, 4.0, 5.0]));
        assert!((s.s[0] - 3.0 * 5f64.sqrt()).abs() < 1e-14);
        assert!((s.s[1] - 5f64.sqrt()).abs() < 1e-14);
        assert!(max_abs_diff(&reconstruct(&s), &mat(2, 2, &[3.0, 0.0, 4.0, 5.0])) < 1e-14);
    }

    #[test]
    fn svd_recovers_a_constructed_spectrum() {
        // A = Q1 · diag(s) · Q2ᵀ with orthonormal Q1 [7, 4], Q2 [5, 4].
        let (q1, _) = qr(&pseudo_random(7, 4, 1));
        let (q2, _) = qr(&pseudo_random(5, 4, 2));
        let spectrum = [10.0, 3.0, 0.5, 1e-3];
        let mut q1s = q1.clone();
        for i in 0..7 {
            for (j, s) in spectrum.iter().enumerate() {
                q1s[(i, j)] *= s;
            }
        }
        let a = q1s.matmul(&q2.transpose());
        for m in [a.clone(), a.transpose()] {
            let s = svd(&m);
            for (got, want) in s.s.iter().zip(spectrum) {
                assert!((got - want).abs() < 1e-12, "{got} vs {want}");
            }
            assert_eq!(s.s.len(), 5);
            assert!(s.s[4].abs() < 1e-12);
            assert!(max_abs_diff(&reconstruct(&s), &m) < 1e-12);
            assert_orthonormal_cols(&s.v, 1e-12);
        }
    }

    #[test]
    fn diagonal_input_is_sorted_with_signs_in_u() {
        let s = svd(&mat(3, 3, &[1.0, 0.0, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0, 2.0]));
        assert_eq!(s.s, vec![4.0, 2.0, 1.0]);
        assert_eq!(s.u[(1, 0)] * s.v[(1, 0)], -1.0);
    }

    #[test]
    fn qr_is_exact_for_tall_wide_and_rank_deficient_inputs() {
        let tall = pseudo_random(9, 4, 3);
        let mut deficient = tall.clone();
        for i in 0..9 {
            deficient[(i, 2)] = deficient[(i, 0)] + deficient[(i, 1)];
            deficient[(i, 3)] = 0.0;
        }
        for a in [tall, pseudo_random(3, 6, 4), deficient] {
            let (q, r) = qr(&a);
            assert_orthonormal_cols(&q, 1e-13);
            assert!(max_abs_diff(&q.matmul(&r), &a) < 1e-12);
            for i in 0..r.rows {
                for j in 0..i.min(r.cols) {
                    assert_eq!(r[(i, j)], 0.0);
                }
            }
        }
    }

    #[test]
    fn product_svd_matches_the_dense_svd() {
        let (up, down) = (pseudo_random(20, 6, 5), pseudo_random(6, 15, 6));
        let dense = up.matmul(&down);
        let (p, d) = (svd_of_product(&up, &down), svd(&dense));
        for (a, b) in p.s.iter().zip(&d.s) {
            assert!((a - b).abs() < 1e-11, "{a} vs {b}");
        }
        assert!(max_abs_diff(&reconstruct(&p), &dense) < 1e-11);
        // Truncating to the true rank loses nothing; to rank 3 loses the tail exactly.
        let (u6, d6) = p.truncate(6);
        assert!(max_abs_diff(&u6.matmul(&d6), &dense) < 1e-11);
        let (u3, d3) = p.truncate(3);
        let err = max_abs_diff(&u3.matmul(&d3), &dense);
        assert!(err > 1e-3);
        let tail: f64 = p.s[3..].iter().map(|s| s * s).sum();
        let mut diff = u3.matmul(&d3);
        diff.data
            .iter_mut()
            .zip(&dense.data)
            .for_each(|(x, y)| *x -= y);
        assert!((diff.frobenius().powi(2) - tail).abs() < 1e-9);
    }

    #[test]
    fn randomized_svd_is_exact_on_low_rank_and_close_on_decaying_spectra() {
        let low = pseudo_random(60, 5, 7).matmul(&pseudo_random(5, 40, 8));
        let t = low.to_tensor_f64().unwrap();
        let r = randomized_svd(&t, 5, 4, 2, 9).unwrap();
        let (u, d) = r.truncate(5);
        assert!(max_abs_diff(&u.matmul(&d), &low) < 1e-10);
        assert!((r.energy_kept(5) / low.frobenius().powi(2) - 1.0).abs() < 1e-12);

        // Full rank, singular values 2^-i: the top 4 are found to 1e-6.
        let (q1, _) = qr(&pseudo_random(80, 30, 10));
        let (q2, _) = qr(&pseudo_random(50, 30, 11));
        let mut q1s = q1.clone();
        for i in 0..80 {
            for j in 0..30 {
                q1s[(i, j)] *= 0.5f64.powi(j as i32);
            }
        }
        let a = q1s.matmul(&q2.transpose());
        let r = randomized_svd(&a.to_tensor_f64().unwrap(), 4, 8, 2, 12).unwrap();
        for j in 0..4 {
            let want = 0.5f64.powi(j as i32);
            assert!((r.s[j] - want).abs() < 1e-6 * want, "{j}: {}", r.s[j]);
        }
    }
}
