//! The one error type of the kernels and its mapping onto `resalign.errors`.
//!
//! Pure-Rust kernels return [`Error`]; the binding layer converts it with the single
//! `From<Error> for PyErr` below, so Python callers always see `resalign.errors.ShapeError`,
//! `resalign.errors.NumericalError` or their base `resalign.errors.NativeError`.

use pyo3::PyErr;

pyo3::import_exception!(resalign.errors, NativeError);
pyo3::import_exception!(resalign.errors, ShapeError);
pyo3::import_exception!(resalign.errors, NumericalError);

/// Why a kernel refused its input or could not finish. Messages name the offending argument.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Array shapes or dtypes do not match what the kernel expects.
    #[error("{0}")]
    Shape(String),
    /// NaN/inf input, or a numerically invalid intermediate (e.g. a covariance that is not PSD).
    #[error("{0}")]
    Numerical(String),
    /// Any other invalid argument (a threshold out of range, a bad thread count).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Shape(msg) => ShapeError::new_err(msg),
            Error::Numerical(msg) => NumericalError::new_err(msg),
            Error::Invalid(msg) => NativeError::new_err(msg),
        }
    }
}

/// Shorthand constructors used by the kernels.
pub(crate) fn shape<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Shape(msg.into()))
}

pub(crate) fn numerical<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Numerical(msg.into()))
}

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}
