//! Summary statistics of per-seed rates (e.g. the harmful rate of each evaluation seed): mean,
//! standard error of the mean and a seeded percentile-bootstrap confidence interval.

use crate::error::{invalid, numerical, shape, Result};

/// xoshiro256** (Blackman & Vigna, 2018), seeded by SplitMix64: a small, portable generator so
/// that a bootstrap interval is reproducible from its seed on every platform.
#[derive(Debug, Clone)]
pub struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire, 2019).
    pub fn below(&mut self, n: u64) -> u64 {
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }
}

/// Mean, SEM and bootstrap interval of a set of rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSummary {
    pub n: usize,
    pub mean: f64,
    /// sample standard deviation (ddof = 1) / √n, as `scipy.stats.sem`; NaN when n = 1
    pub sem: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// `numpy.quantile(sorted, q)` with the default "linear" method, on an ascending slice.
pub fn quantile_linear(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let t = h - lo as f64;
    let (a, b) = (sorted[lo], sorted[hi]);
    // numpy's _lerp: a + (b − a)·t, written from the upper end when t ≥ 0.5
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// Bootstrap means: `n_boot` resamples (with replacement, indices from [`Xoshiro256::below`]),
/// each the plain left-to-right sum of its draws divided by n.
pub fn bootstrap_means(values: &[f64], n_boot: usize, seed: u64) -> Vec<f64> {
    let n = values.len();
    let mut rng = Xoshiro256::seed_from_u64(seed);
    (0..n_boot)
        .map(|_| {
            let mut sum = 0.0;
            for _ in 0..n {
                sum += values[rng.below(n as u64) as usize];
            }
            sum / n as f64
        })
        .collect()
}

/// Mean, SEM (ddof = 1) and the percentile-bootstrap interval [q(α/2), q(1 − α/2)] of the mean,
/// α = 1 − `confidence`, from `n_boot` resamples drawn with the generator seeded by `seed`.
pub fn summarize_rates(
    values: &[f64],
    confidence: f64,
    n_boot: usize,
    seed: u64,
) -> Result<RateSummary> {
    let n = values.len();
    if n == 0 {
        return shape("values is empty: need at least one rate");
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return numerical(format!("values contains NaN or inf (at [{i}])"));
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return invalid(format!("confidence must lie in (0, 1), got {confidence}"));
    }
    if n_boot == 0 {
        return invalid("n_boot must be at least 1");
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let sem = if n > 1 {
        let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
        (ss / (n as f64 - 1.0)).sqrt() / (n as f64).sqrt()
    } else {
        f64::NAN
    };
    let mut means = bootstrap_means(values, n_boot, seed);
    means.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let alpha = 1.0 - confidence;
    Ok(RateSummary {
        n,
        mean,
        sem,
        ci_low: quantile_linear(&means, alpha / 2.0),
        ci_high: quantile_linear(&means, 1.0 - alpha / 2.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same seed, same stream; `below` covers its range evenly.
    #[test]
    fn generator_is_deterministic_and_unbiased_in_range() {
        let mut a = Xoshiro256::seed_from_u64(42);
        let mut b = Xoshiro256::seed_from_u64(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[a.below(3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn summary_matches_hand_computed_values() {
        let v = [0.1, 0.2, 0.3, 0.4];
        let s = summarize_rates(&v, 0.95, 2000, 0).unwrap();
        assert!((s.mean - 0.25).abs() < 1e-15);
        // sample sd = sqrt(0.05 / 3), sem = sd / 2
        assert!((s.sem - (0.05f64 / 3.0).sqrt() / 2.0).abs() < 1e-15);
        assert!(s.ci_low < s.mean && s.mean < s.ci_high);
        assert!(s.ci_low >= 0.1 && s.ci_high <= 0.4);
        assert_eq!(s, summarize_rates(&v, 0.95, 2000, 0).unwrap());
        assert_ne!(bootstrap_means(&v, 50, 0), bootstrap_means(&v, 50, 1));
    }

    #[test]
    fn quantile_matches_numpy_linear_rule() {
        let x = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(quantile_linear(&x, 0.0), 1.0);
        assert_eq!(quantile_linear(&x, 1.0), 8.0);
        assert!((quantile_linear(&x, 0.5) - 3.0).abs() < 1e-15);
        assert!((quantile_linear(&x, 0.25) - 1.75).abs() < 1e-15);
    }

    #[test]
    fn single_value_and_bad_input() {
        let s = summarize_rates(&[0.3], 0.9, 10, 0).unwrap();
        assert!(s.sem.is_nan());
        assert_eq!((s.ci_low, s.ci_high), (0.3, 0.3));
        assert!(summarize_rates(&[], 0.9, 10, 0).is_err());
        assert!(summarize_rates(&[f64::NAN], 0.9, 10, 0).is_err());
        assert!(summarize_rates(&[0.1, 0.2], 1.5, 10, 0).is_err());
    }
}
