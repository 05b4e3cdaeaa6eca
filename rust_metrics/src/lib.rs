//! `resalign._native`: metric kernels for bulk evaluation (Fréchet distance, feature statistics,
//! detector post-processing, rate statistics). numpy in, numpy out, the GIL released around kernels.
use pyo3::prelude::*;

/// Mean of a rate vector (placeholder kernel, replaced by the metric modules).
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
