//! Streaming feature statistics: mean and unbiased covariance of feature vectors that arrive in
//! batches, possibly on several workers (sharded evaluation), without keeping the features.
//!
//! State: the count n, the f64 mean μ and the centred Gram matrix M = Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ
//! (lower triangle). A batch is folded in, and two accumulators are merged, with the pairwise
//! update of Chan, Golub & LeVeque (1979):
//!
//! n = na + nb,  δ = μb − μa,  μ = μa + δ·nb/n,  M = Ma + Mb + δδᵀ·na·nb/n,
//!
//! which equals the statistics of the concatenated data and, unlike raw sums Σx and Σxxᵀ, does not
//! lose precision when the features have a large mean. Covariance = M / (n − 1), as
//! `numpy.cov(x, rowvar=False)`.

use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

use crate::error::{numerical, shape, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    dim: usize,
    count: u64,
    mean: Vec<f64>,
    /// Σ (x − μ)(x − μ)ᵀ; only the lower triangle is maintained.
    comoment: Mat<f64>,
}

impl FeatureStats {
    /// An empty accumulator for `dim`-dimensional features.
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 {
            return shape("dim must be at least 1");
        }
        Ok(Self { dim, count: 0, mean: vec![0.0; dim], comoment: Mat::zeros(dim, dim) })
    }

    /// Rebuild an accumulator from its state (count, mean, co-moment matrix), e.g. after pickling.
    pub fn from_state(count: u64, mean: Vec<f64>, comoment: Mat<f64>) -> Result<Self> {
        let dim = mean.len();
        if dim == 0 {
            return shape("mean must have at least one element");
        }
        if comoment.nrows() != dim || comoment.ncols() != dim {
            return shape(format!(
                "comoment must have shape ({dim}, {dim}) to match mean, got ({}, {})",
                comoment.nrows(),
                comoment.ncols()
            ));
        }
        if mean.iter().any(|v| !v.is_finite()) {
            return numerical("mean contains NaN or inf");
        }
        Ok(Self { dim, count, mean, comoment })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The full symmetric co-moment matrix Σ (x − μ)(x − μ)ᵀ.
    pub fn comoment(&self) -> Mat<f64> {
        let m = &self.comoment;
        Mat::from_fn(self.dim, self.dim, |i, j| if i >= j { m[(i, j)] } else { m[(j, i)] })
    }

    /// Unbiased covariance M / (n − 1) (numpy.cov with rowvar=False); needs n ≥ 2.
    pub fn covariance(&self) -> Result<Mat<f64>> {
        if self.count < 2 {
            return numerical(format!(
                "the covariance needs at least 2 feature vectors, this accumulator has {}",
                self.count
            ));
        }
        let scale = 1.0 / (self.count as f64 - 1.0);
        let m = &self.comoment;
        Ok(Mat::from_fn(self.dim, self.dim, |i, j| {
            scale * if i >= j { m[(i, j)] } else { m[(j, i)] }
        }))
    }

    /// Fold in `rows` feature vectors stored row-major in `batch` (length rows · dim).
    pub fn update(&mut self, batch: &[f64], rows: usize, par: Par) -> Result<()> {
        let d = self.dim;
        if batch.len() != rows * d {
            return shape(format!(
                "batch must have shape (rows, {d}); got {} values for {rows} rows",
                batch.len()
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        if let Some(k) = batch.iter().position(|v| !v.is_finite()) {
            return numerical(format!(
                "batch contains NaN or inf (row {}, column {})",
                k / d,
                k % d
            ));
        }
        let mut mean_b = vec![0.0; d];
        for row in batch.chunks_exact(d) {
            for (m, &v) in mean_b.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean_b.iter_mut().for_each(|m| *m /= rows as f64);
        // Centred batch, stored so that column i is row i: a d × rows column-major matrix Xcᵀ.
        let mut centred = Vec::with_capacity(batch.len());
        for row in batch.chunks_exact(d) {
            centred.extend(row.iter().zip(&mean_b).map(|(v, m)| v - m));
        }
        let xt = MatRef::from_column_major_slice(&centred, d, rows);
        let mut m_b = Mat::<f64>::zeros(d, d);
        tri_matmul(
            m_b.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            xt,
            BlockStructure::Rectangular,
            xt.transpose(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        self.combine(rows as u64, &mean_b, &m_b);
        Ok(())
    }

    /// Merge `other` into `self`: afterwards `self` holds the statistics of both sets of features.
    pub fn merge(&mut self, other: &FeatureStats) -> Result<()> {
        if other.dim != self.dim {
            return shape(format!(
                "cannot merge accumulators of different feature dimensions ({} and {})",
                self.dim, other.dim
            ));
        }
        let (count, mean, m) = (other.count, other.mean.clone(), other.comoment.clone());
        self.combine(count, &mean, &m);
        Ok(())
    }

    /// Chan et al.'s pairwise update with a block (n_b, μ_b, M_b) (lower triangle of M_b used).
    fn combine(&mut self, n_b: u64, mean_b: &[f64], m_b: &Mat<f64>) {
        if n_b == 0 {
            return;
        }
        let n_a = self.count;
        let n = n_a + n_b;
        let delta: Vec<f64> = mean_b.iter().zip(&self.mean).map(|(b, a)| b - a).collect();
        let w = (n_a as f64) * (n_b as f64) / (n as f64);
        let f = n_b as f64 / n as f64;
        for j in 0..self.dim {
            for i in j..self.dim {
                self.comoment[(i, j)] += m_b[(i, j)] + w * delta[i] * delta[j];
            }
        }
        for (m, dl) in self.mean.iter_mut().zip(&delta) {
            *m += dl * f;
        }
        self.count = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_features, sample_covariance, Lcg};

    fn max_rel_diff(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
        let mut scale = 0.0f64;
        let mut diff = 0.0f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                scale = scale.max(b[(i, j)].abs());
                diff = diff.max((a[(i, j)] - b[(i, j)]).abs());
            }
        }
        diff / scale
    }

    #[test]
    fn batched_updates_equal_two_pass_statistics() {
        let mut rng = Lcg::new(1);
        let (n, d) = (250, 12);
        let x = random_features(&mut rng, n, d);
        let mut acc = FeatureStats::new(d).unwrap();
        for (start, end) in [(0, 1), (1, 40), (40, 40), (40, 250)] {
            acc.update(&x[start * d..end * d], end - start, Par::Seq).unwrap();
        }
        let (mu, cov) = sample_covariance(&x, n, d);
        assert_eq!(acc.count(), n as u64);
        for (a, b) in acc.mean().iter().zip(&mu) {
            assert!((a - b).abs() < 1e-13 * b.abs());
        }
        assert!(max_rel_diff(&acc.covariance().unwrap(), &cov) < 1e-12);
    }

    #[test]
    fn merge_equals_concatenation() {
        let mut rng = Lcg::new(2);
        let d = 9;
        let x = random_features(&mut rng, 100, d);
        let mut left = FeatureStats::new(d).unwrap();
        left.update(&x[..30 * d], 30, Par::Seq).unwrap();
        let mut right = FeatureStats::new(d).unwrap();
        right.update(&x[30 * d..], 70, Par::Seq).unwrap();
        left.merge(&right).unwrap();
        let mut whole = FeatureStats::new(d).unwrap();
        whole.update(&x, 100, Par::Seq).unwrap();
        assert_eq!(left.count(), whole.count());
        assert!(max_rel_diff(&left.covariance().unwrap(), &whole.covariance().unwrap()) < 1e-12);
        // Merging an empty accumulator changes nothing.
        let before = left.clone();
        left.merge(&FeatureStats::new(d).unwrap()).unwrap();
        assert_eq!(left, before);
    }

    #[test]
    fn errors_name_the_problem() {
        let mut acc = FeatureStats::new(3).unwrap();
        assert!(matches!(acc.covariance(), Err(crate::error::Error::Numerical(_))));
        assert!(matches!(acc.update(&[1.0; 5], 2, Par::Seq), Err(crate::error::Error::Shape(_))));
        assert!(matches!(
            acc.update(&[1.0, f64::NAN, 0.0], 1, Par::Seq),
            Err(crate::error::Error::Numerical(_))
        ));
        let other = FeatureStats::new(4).unwrap();
        assert!(matches!(acc.merge(&other), Err(crate::error::Error::Shape(_))));
    }
}
