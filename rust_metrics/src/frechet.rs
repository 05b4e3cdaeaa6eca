//! Fréchet distance between two Gaussians N(μ1, Σ1) and N(μ2, Σ2):
//!
//! FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}.
//!
//! The trace term is computed on a symmetric matrix with the same eigenvalues as Σ1 Σ2:
//! with any factor L such that Σ1 = L Lᵀ, the matrix Lᵀ Σ2 L is symmetric positive semi-definite
//! and its eigenvalues are those of Σ1 Σ2, so tr (Σ1 Σ2)^{1/2} = Σᵢ √λᵢ(Lᵀ Σ2 L).
//! L is the Cholesky factor when Σ1 is well-conditioned positive definite; otherwise (e.g. fewer
//! samples than feature dimensions) L = V Λ^{1/2} from the eigendecomposition Σ1 = V Λ Vᵀ,
//! restricted to the eigenvalues above the numerical-rank cutoff d·ε·λ_max (the convention of
//! `numpy.linalg.matrix_rank`); the others, round-off of exact zeros, are clamped to zero, and so
//! are the eigenvalues of Lᵀ Σ2 L below the same cutoff (Σ2 singular). No eps
//! is added to the diagonal, so a singular Σ gives the value of the formula itself, not that of a
//! shifted matrix.
//!
//! This is the quantity pytorch-fid's `calculate_frechet_distance` computes with
//! `scipy.linalg.sqrtm(Σ1 Σ2)`, at a fraction of the cost (one Cholesky or one symmetric
//! eigendecomposition, two triangular-aware products, one symmetric eigenvalue solve, the last
//! by the two-stage tridiagonal reduction of [`crate::symeig`] for large d).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::diag::Diag;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::error::{numerical, shape, Result};
use crate::symeig;

/// Relative tolerance for asymmetry of an input covariance: max |Σ − Σᵀ| ≤ tol · max |Σ|.
pub const SYMMETRY_TOLERANCE: f64 = 1e-6;

/// Eigenvalues below −tol · λ_max are rejected as "not positive semi-definite"; eigenvalues in
/// [−tol · λ_max, 0) are round-off (e.g. a covariance stored in float32) and are clamped to zero.
pub const PSD_TOLERANCE: f64 = 1e-4;

/// Which factorisation of Σ1 produced the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Σ1 = L Lᵀ by Cholesky (Σ1 positive definite).
    Cholesky,
    /// Σ1 = V Λ Vᵀ by symmetric eigendecomposition (Σ1 singular or nearly so).
    Eigh,
}

/// The distance with the pieces it is made of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frechet {
    /// ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}
    pub distance: f64,
    /// ‖μ1 − μ2‖²
    pub mean_term: f64,
    /// tr (Σ1 Σ2)^{1/2}
    pub trace_sqrt: f64,
    pub route: Route,
}

/// Check that `m` is a finite, square, d×d, symmetric matrix and return its symmetric part
/// (Σ + Σᵀ)/2, so that products below see an exactly symmetric operand.
fn checked_covariance(name: &str, m: MatRef<'_, f64>, d: usize) -> Result<Mat<f64>> {
    if m.nrows() != d || m.ncols() != d {
        return shape(format!(
            "{name} must have shape ({d}, {d}) to match the mean vectors, got ({}, {})",
            m.nrows(),
            m.ncols()
        ));
    }
    let mut max_abs = 0.0f64;
    for j in 0..d {
        let col = m.col(j);
        for i in 0..d {
            let v = col[i];
            if !v.is_finite() {
                return numerical(format!("{name} contains NaN or inf (at [{i}, {j}])"));
            }
            max_abs = max_abs.max(v.abs());
        }
    }
    // Symmetric part and asymmetry, tile by tile so that the transposed reads stay in cache.
    const TILE: usize = 64;
    let mut out = Mat::<f64>::zeros(d, d);
    let mut max_asym = 0.0f64;
    for jb in (0..d).step_by(TILE) {
        let je = (jb + TILE).min(d);
        for ib in (jb..d).step_by(TILE) {
            let ie = (ib + TILE).min(d);
            for j in jb..je {
                for i in ib.max(j)..ie {
                    let (a, b) = (m[(i, j)], m[(j, i)]);
                    max_asym = max_asym.max((a - b).abs());
                    let v = 0.5 * (a + b);
                    out[(i, j)] = v;
                    out[(j, i)] = v;
                }
            }
        }
    }
    if max_asym > SYMMETRY_TOLERANCE * max_abs {
        return numerical(format!(
            "{name} is not symmetric (max |S - S^T| = {max_asym:.3e}, max |S| = {max_abs:.3e}); \
             pass a covariance matrix"
        ));
    }
    Ok(out)
}

fn checked_mean(name: &str, mu: &[f64]) -> Result<()> {
    if let Some(i) = mu.iter().position(|v| !v.is_finite()) {
        return numerical(format!("{name} contains NaN or inf (at [{i}])"));
    }
    Ok(())
}

/// Numerical-rank cutoff d·ε·scale below which an eigenvalue or Cholesky pivot counts as zero.
fn rank_cutoff(d: usize, scale: f64) -> f64 {
    d as f64 * f64::EPSILON * scale
}

/// Relative size below which a Cholesky pivot L_ii² (compared with max Σ_ii) sends Σ1 to the
/// eigendecomposition route: √ε. Pivots are bounded below by λ_min(Σ1), so a positive definite
/// covariance of condition number below ~10⁸ always passes, while the round-off pivots of a
/// singular one (≈ ε · max Σ_ii) never do. On a singular Σ1 a completed Cholesky factor would
/// carry its round-off into tr (Σ1Σ2)^{1/2} amplified to O(√ε).
pub const CHOLESKY_PIVOT_TOLERANCE: f64 = 1.5e-8;

/// Σ1 = L Lᵀ with L lower triangular, or `None` when Σ1 is not well enough conditioned for it:
/// the factorisation breaks down, or a pivot L_ii² is below [`CHOLESKY_PIVOT_TOLERANCE`].
fn cholesky_factor(sigma1: MatRef<'_, f64>, par: Par) -> Option<Mat<f64>> {
    let d = sigma1.nrows();
    let max_diag = (0..d).map(|i| sigma1[(i, i)]).fold(0.0f64, f64::max);
    let mut l = sigma1.to_owned();
    let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(d, par, Default::default()));
    let ok = cholesky_in_place(
        l.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .is_ok();
    if !ok {
        return None;
    }
    let cutoff = CHOLESKY_PIVOT_TOLERANCE * max_diag;
    if (0..d).any(|i| l[(i, i)] * l[(i, i)] <= cutoff) {
        return None;
    }
    for j in 0..d {
        for i in 0..j {
            l[(i, j)] = 0.0;
        }
    }
    Some(l)
}

/// Eigenvalues of a symmetric matrix (only its lower triangle is read), ascending.
///
/// From dimension [`symeig::TWO_STAGE_MIN_DIM`] on, by the two-stage reduction of
/// [`crate::symeig`] (full → band → tridiagonal, matrix–matrix products for the O(n³) part);
/// below it, by faer's one-stage `self_adjoint_evd`, which is as fast there.
pub fn symmetric_eigenvalues(a: MatRef<'_, f64>, par: Par) -> Result<Vec<f64>> {
    if a.nrows() >= symeig::TWO_STAGE_MIN_DIM {
        return symeig::eigenvalues(a, symeig::DEFAULT_BANDWIDTH, par);
    }
    one_stage_eigenvalues(a, par)
}

/// [`symmetric_eigenvalues`], using (and overwriting) the lower triangle of `a` as workspace.
fn symmetric_eigenvalues_in_place(a: MatMut<'_, f64>, par: Par) -> Result<Vec<f64>> {
    let n = a.nrows();
    if n >= symeig::TWO_STAGE_MIN_DIM {
        return symeig::eigenvalues_in_place(a, symeig::DEFAULT_BANDWIDTH, par);
    }
    one_stage_eigenvalues(a.rb(), par)
}

/// faer's `self_adjoint_evd` (one-stage Householder tridiagonalization, then QR), eigenvalues only.
pub(crate) fn one_stage_eigenvalues(a: MatRef<'_, f64>, par: Par) -> Result<Vec<f64>> {
    let n = a.nrows();
    let mut s = Diag::<f64>::zeros(n);
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        n,
        ComputeEigenvectors::No,
        par,
        Default::default(),
    ));
    self_adjoint_evd(a, s.as_mut(), None, par, MemStack::new(&mut mem), Default::default())
        .or_else(|e| numerical(format!("symmetric eigenvalue solver did not converge: {e:?}")))?;
    Ok(s.column_vector().iter().copied().collect())
}

/// Σ1 ≈ L Lᵀ with L = V Λ^{1/2} restricted to the eigenvalues above the rank cutoff
/// (d × r, r = numerical rank).
fn eigh_factor(sigma1: MatRef<'_, f64>, par: Par) -> Result<Mat<f64>> {
    let d = sigma1.nrows();
    let mut s = Diag::<f64>::zeros(d);
    let mut v = Mat::<f64>::zeros(d, d);
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        d,
        ComputeEigenvectors::Yes,
        par,
        Default::default(),
    ));
    self_adjoint_evd(
        sigma1,
        s.as_mut(),
        Some(v.as_mut()),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .or_else(|e| numerical(format!("eigendecomposition of sigma1 did not converge: {e:?}")))?;
    let lambda: Vec<f64> = s.column_vector().iter().copied().collect();
    let lmax = lambda.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
    let lmin = lambda.iter().copied().fold(f64::INFINITY, f64::min);
    if lmin < -PSD_TOLERANCE * lmax {
        return numerical(format!(
            "sigma1 is not positive semi-definite (eigenvalue {lmin:.3e}, largest {lmax:.3e})"
        ));
    }
    // Eigenvalues clamped to zero would contribute zero columns: keep only the others.
    let cutoff = rank_cutoff(d, lmax);
    let keep: Vec<usize> = (0..d).filter(|&k| lambda[k] > cutoff).collect();
    Ok(Mat::from_fn(d, keep.len(), |i, c| {
        let k = keep[c];
        v[(i, k)] * lambda[k].sqrt()
    }))
}

/// tr (Σ1 Σ2)^{1/2} = Σ √λ(Lᵀ Σ2 L), with the Cholesky or eigh factor L of Σ1.
///
/// `sigma1` and `sigma2` must be symmetric (only checked by [`frechet_distance`]).
pub fn trace_sqrt_product(
    sigma1: MatRef<'_, f64>,
    sigma2: MatRef<'_, f64>,
    par: Par,
) -> Result<(f64, Route)> {
    trace_sqrt_product_owned(sigma1.to_owned(), sigma2.to_owned(), par)
}

/// [`trace_sqrt_product`] on owned copies of Σ1 and Σ2, whose storage is reused for Σ2 L and
/// Lᵀ Σ2 L (each d × d buffer costs a fresh allocation and its page faults otherwise).
fn trace_sqrt_product_owned(mut s1: Mat<f64>, mut s2: Mat<f64>, par: Par) -> Result<(f64, Route)> {
    let d = s1.nrows();
    let (l, route, l_structure) = match cholesky_factor(s1.as_ref(), par) {
        Some(l) => (l, Route::Cholesky, BlockStructure::TriangularLower),
        None => (eigh_factor(s1.as_ref(), par)?, Route::Eigh, BlockStructure::Rectangular),
    };
    let r = l.ncols();
    if r == 0 {
        return Ok((0.0, route));
    }
    // B = Σ2 L  (d × r), in Σ1's storage (Σ1 is no longer needed)
    let mut b = s1.as_mut().submatrix_mut(0, 0, d, r);
    tri_matmul(
        b.rb_mut(),
        BlockStructure::Rectangular,
        Accum::Replace,
        s2.as_ref(),
        BlockStructure::Rectangular,
        l.as_ref(),
        l_structure,
        1.0,
        par,
    );
    // C = Lᵀ B, lower triangle only (r × r, symmetric), in Σ2's storage
    let lt_structure = match l_structure {
        BlockStructure::TriangularLower => BlockStructure::TriangularUpper,
        other => other,
    };
    let mut c = s2.as_mut().submatrix_mut(0, 0, r, r);
    tri_matmul(
        c.rb_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        l.transpose(),
        lt_structure,
        b.rb(),
        BlockStructure::Rectangular,
        1.0,
        par,
    );
    drop(l);
    let eig = symmetric_eigenvalues_in_place(c, par)?;
    let lmax = eig.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
    let lmin = eig.iter().copied().fold(f64::INFINITY, f64::min);
    if lmin < -PSD_TOLERANCE * lmax {
        return numerical(format!(
            "sigma2 is not positive semi-definite (eigenvalue of L^T sigma2 L {lmin:.3e}, \
             largest {lmax:.3e})"
        ));
    }
    // Eigenvalues below the rank cutoff are round-off of exact zeros (Σ2 singular): counting
    // them would add √ε-sized terms, so they are clamped to zero like the negative ones.
    let cutoff = rank_cutoff(d, lmax);
    let trace = eig.iter().filter(|&&x| x > cutoff).map(|&x| x.sqrt()).sum();
    Ok((trace, route))
}

/// FD(N(μ1, Σ1), N(μ2, Σ2)) = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}, in f64.
///
/// Errors: [`crate::error::Error::Shape`] when μ1, μ2 differ in length or a Σ is not d×d;
/// [`crate::error::Error::Numerical`] on NaN/inf, an asymmetric Σ, or a Σ with a clearly negative
/// eigenvalue.
pub fn frechet_distance(
    mu1: &[f64],
    sigma1: MatRef<'_, f64>,
    mu2: &[f64],
    sigma2: MatRef<'_, f64>,
    par: Par,
) -> Result<Frechet> {
    let d = mu1.len();
    if d == 0 {
        return shape("mu1 is empty: the feature dimension must be at least 1");
    }
    if mu2.len() != d {
        return shape(format!(
            "mu1 and mu2 have different lengths ({d} and {}): the statistics come from \
             different feature extractors",
            mu2.len()
        ));
    }
    checked_mean("mu1", mu1)?;
    checked_mean("mu2", mu2)?;
    let s1 = checked_covariance("sigma1", sigma1, d)?;
    let s2 = checked_covariance("sigma2", sigma2, d)?;
    let mean_term: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let tr1: f64 = (0..d).map(|i| s1[(i, i)]).sum();
    let tr2: f64 = (0..d).map(|i| s2[(i, i)]).sum();
    let (trace_sqrt, route) = trace_sqrt_product_owned(s1, s2, par)?;
    Ok(Frechet {
        distance: mean_term + tr1 + tr2 - 2.0 * trace_sqrt,
        mean_term,
        trace_sqrt,
        route,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_features, sample_covariance, Lcg};

    /// tr (Σ1 Σ2)^{1/2} for diagonal Σ1 = diag(a), Σ2 = diag(b) is Σ √(aᵢ bᵢ).
    #[test]
    fn diagonal_case_has_closed_form() {
        let a = [1.0, 4.0, 9.0, 0.25];
        let b = [4.0, 1.0, 1.0, 16.0];
        let s1 = Mat::from_fn(4, 4, |i, j| if i == j { a[i] } else { 0.0 });
        let s2 = Mat::from_fn(4, 4, |i, j| if i == j { b[i] } else { 0.0 });
        let mu1 = [0.0, 1.0, 2.0, 3.0];
        let mu2 = [1.0, 1.0, 0.0, 3.0];
        let fd = frechet_distance(&mu1, s1.as_ref(), &mu2, s2.as_ref(), Par::Seq).unwrap();
        let expected_trace: f64 = a.iter().zip(&b).map(|(x, y)| (x * y).sqrt()).sum();
        let expected = 1.0 + 4.0 + a.iter().sum::<f64>() + b.iter().sum::<f64>() - 2.0 * expected_trace;
        assert_eq!(fd.route, Route::Cholesky);
        assert!((fd.distance - expected).abs() < 1e-12, "{} vs {expected}", fd.distance);
    }

    /// The distance of a Gaussian to itself is zero, whichever route is taken.
    #[test]
    fn self_distance_is_zero_for_full_and_singular_covariances() {
        let mut rng = Lcg::new(7);
        for (n, d) in [(200, 16), (10, 32)] {
            let x = random_features(&mut rng, n, d);
            let (mu, s) = sample_covariance(&x, n, d);
            let fd = frechet_distance(&mu, s.as_ref(), &mu, s.as_ref(), Par::Seq).unwrap();
            let tr: f64 = (0..d).map(|i| s[(i, i)]).sum();
            assert!(fd.distance.abs() < 1e-9 * tr, "n={n} d={d}: {}", fd.distance);
            let expected_route = if n > d { Route::Cholesky } else { Route::Eigh };
            assert_eq!(fd.route, expected_route);
        }
    }

    /// The Cholesky and eigh factorisations give the same trace term on a positive definite Σ1.
    #[test]
    fn both_routes_agree() {
        let mut rng = Lcg::new(11);
        let d = 24;
        let (_, s1) = sample_covariance(&random_features(&mut rng, 100, d), 100, d);
        let (_, s2) = sample_covariance(&random_features(&mut rng, 80, d), 80, d);
        let (t_chol, route) = trace_sqrt_product(s1.as_ref(), s2.as_ref(), Par::Seq).unwrap();
        assert_eq!(route, Route::Cholesky);
        let l = eigh_factor(s1.as_ref(), Par::Seq).unwrap();
        let c = l.transpose() * &s2 * &l;
        let t_eigh: f64 = symmetric_eigenvalues(c.as_ref(), Par::Seq)
            .unwrap()
            .iter()
            .map(|x| x.max(0.0).sqrt())
            .sum();
        assert!((t_chol - t_eigh).abs() < 1e-10 * t_chol, "{t_chol} vs {t_eigh}");
    }

    /// Two threads and one give the same value (to round-off).
    #[test]
    fn parallel_matches_sequential() {
        let mut rng = Lcg::new(3);
        let d = 96;
        let (m1, s1) = sample_covariance(&random_features(&mut rng, 300, d), 300, d);
        let (m2, s2) = sample_covariance(&random_features(&mut rng, 300, d), 300, d);
        let a = frechet_distance(&m1, s1.as_ref(), &m2, s2.as_ref(), Par::Seq).unwrap();
        let b = frechet_distance(&m1, s1.as_ref(), &m2, s2.as_ref(), Par::rayon(2)).unwrap();
        assert!((a.distance - b.distance).abs() < 1e-10 * a.distance.abs());
    }

    #[test]
    fn rejects_bad_input() {
        let s = Mat::<f64>::identity(3, 3);
        let mu = [0.0; 3];
        let err = frechet_distance(&mu, s.as_ref(), &[0.0; 2], s.as_ref(), Par::Seq).unwrap_err();
        assert!(matches!(err, crate::error::Error::Shape(ref m) if m.contains("mu2")));
        let s4 = Mat::<f64>::identity(4, 4);
        let err = frechet_distance(&mu, s.as_ref(), &mu, s4.as_ref(), Par::Seq).unwrap_err();
        assert!(matches!(err, crate::error::Error::Shape(ref m) if m.contains("sigma2")));
        let mut bad = s.clone();
        bad[(1, 1)] = f64::NAN;
        let err = frechet_distance(&mu, bad.as_ref(), &mu, s.as_ref(), Par::Seq).unwrap_err();
        assert!(matches!(err, crate::error::Error::Numerical(ref m) if m.contains("sigma1")));
        let mut asym = s.clone();
        asym[(0, 2)] = 0.5;
        let err = frechet_distance(&mu, s.as_ref(), &mu, asym.as_ref(), Par::Seq).unwrap_err();
        assert!(matches!(err, crate::error::Error::Numerical(ref m) if m.contains("symmetric")));
        let mut indefinite = s.clone();
        indefinite[(2, 2)] = -1.0;
        let err =
            frechet_distance(&mu, indefinite.as_ref(), &mu, s.as_ref(), Par::Seq).unwrap_err();
        assert!(matches!(err, crate::error::Error::Numerical(ref m) if m.contains("semi-definite")));
    }
}
