//! Helpers shared by the Rust unit tests: a tiny deterministic generator and a two-pass
//! (textbook) sample covariance used as the independent reference.

use faer::Mat;

/// 64-bit linear congruential generator (Knuth's MMIX constants); test data only.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1))
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// n × d row-major features with correlated columns and a non-zero mean.
pub fn random_features(rng: &mut Lcg, n: usize, d: usize) -> Vec<f64> {
    let mut x = vec![0.0; n * d];
    for i in 0..n {
        let shared = rng.uniform();
        for j in 0..d {
            x[i * d + j] = 3.0 + (j as f64) * 0.1 + rng.uniform() - 0.5 + 0.3 * shared;
        }
    }
    x
}

/// Mean and unbiased covariance (divisor n − 1) of row-major n × d data, by two passes.
pub fn sample_covariance(x: &[f64], n: usize, d: usize) -> (Vec<f64>, Mat<f64>) {
    let mut mu = vec![0.0; d];
    for i in 0..n {
        for j in 0..d {
            mu[j] += x[i * d + j];
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    let s = Mat::from_fn(d, d, |a, b| {
        (0..n).map(|i| (x[i * d + a] - mu[a]) * (x[i * d + b] - mu[b])).sum::<f64>()
            / (n as f64 - 1.0)
    });
    (mu, s)
}
