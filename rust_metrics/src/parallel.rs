//! How many threads the dense kernels (faer, on rayon's global pool) may use.
//!
//! Resolution order: the explicit `threads` argument, then the `RESALIGN_NATIVE_THREADS`
//! environment variable, then [`DEFAULT_THREADS`]. `0` means "every thread of rayon's pool".

use faer::Par;

use crate::error::{invalid, Result};

/// Environment variable that sets the default thread count of the dense kernels.
pub const THREADS_ENV: &str = "RESALIGN_NATIVE_THREADS";

/// Default thread count when neither the argument nor the environment sets one.
///
/// One thread: on the 2-core machines this project is measured on, two rayon threads were slower
/// than one whenever another process held a core (see docs/performance.md); set
/// `RESALIGN_NATIVE_THREADS=0` on a dedicated many-core machine.
pub const DEFAULT_THREADS: usize = 1;

/// The thread count in effect for `threads` (argument, else environment, else default).
pub fn resolve_threads(threads: Option<usize>) -> Result<usize> {
    if let Some(n) = threads {
        return Ok(n);
    }
    match std::env::var(THREADS_ENV) {
        Ok(text) if !text.trim().is_empty() => text.trim().parse::<usize>().or_else(|_| {
            invalid(format!(
                "{THREADS_ENV}={text:?} is not a thread count (a non-negative integer; 0 = all cores)"
            ))
        }),
        _ => Ok(DEFAULT_THREADS),
    }
}

/// The faer parallelism for a resolved thread count: 1 is sequential, 0 is rayon's whole pool.
pub fn par_for(threads: usize) -> Par {
    match threads {
        1 => Par::Seq,
        n => Par::rayon(n),
    }
}

/// Resolve `threads` and turn it into a faer parallelism in one step.
pub fn parallelism(threads: Option<usize>) -> Result<Par> {
    resolve_threads(threads).map(par_for)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_count_wins() {
        assert_eq!(resolve_threads(Some(3)).unwrap(), 3);
        assert_eq!(par_for(1), Par::Seq);
        assert!(matches!(par_for(2), Par::Rayon(n) if n.get() == 2));
    }
}
