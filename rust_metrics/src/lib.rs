//! `resalign._native`: metric kernels for bulk evaluation. numpy in, numpy out.
//!
//! - [`frechet`]: Fréchet distance between Gaussians (faer, f64, symmetric route);
//! - [`stats`]: streaming feature mean/covariance with merging (sharded evaluation);
//! - [`detect`]: batched YOLOv8 decode + NMS matching the `nudenet` package;
//! - [`rates`]: mean, SEM and seeded bootstrap interval of per-seed rates.
//!
//! The kernels are plain Rust on owned buffers (tested by `cargo test` without Python). The
//! binding functions below copy their numpy inputs into owned f64/f32 buffers while holding the
//! GIL, then run the kernel through [`detached`], the one helper that releases the GIL, reports a
//! pending Ctrl-C and maps [`error::Error`] onto `resalign.errors`.

pub mod detect;
pub mod error;
pub mod frechet;
pub mod parallel;
pub mod rates;
pub mod stats;
pub mod symeig;
#[cfg(test)]
mod testutil;

use faer::Mat;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::error::{shape, Error};

/// Run `kernel` with the GIL released; afterwards surface a pending KeyboardInterrupt and map a
/// kernel error onto the `resalign.errors` classes.
fn detached<T, F>(py: Python<'_>, kernel: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error> + Send,
    T: Send,
{
    let out = py.detach(kernel);
    py.check_signals()?;
    Ok(out?)
}

// ------------------------------------------------------------------------------ array input

/// A numpy array copied into a row-major buffer, with its shape.
struct Owned<T> {
    data: Vec<T>,
    shape: Vec<usize>,
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!(
            "a {}-d {} array",
            a.ndim(),
            a.dtype().str().map(|s| s.to_string()).unwrap_or_default()
        ),
        Err(_) => format!(
            "{}",
            obj.get_type().name().map(|s| s.to_string()).unwrap_or_default()
        ),
    }
}

fn check_ndim(name: &str, shape_: &[usize], ndim: usize, what: &str) -> Result<(), Error> {
    if shape_.len() != ndim {
        return shape(format!("{name} must be {what}, got an array with shape {shape_:?}"));
    }
    Ok(())
}

/// A float32 or float64 numpy array as f64.
fn read_f64(name: &str, obj: &Bound<'_, PyAny>, ndim: usize, what: &str) -> Result<Owned<f64>, Error> {
    let owned = if let Ok(a) = obj.cast::<PyArrayDyn<f64>>() {
        let ro = a.readonly();
        let v = ro.as_array();
        Owned { shape: v.shape().to_vec(), data: v.iter().copied().collect() }
    } else if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        let ro = a.readonly();
        let v = ro.as_array();
        Owned { shape: v.shape().to_vec(), data: v.iter().map(|&x| f64::from(x)).collect() }
    } else {
        return shape(format!(
            "{name} must be a float32 or float64 numpy array ({what}), got {}",
            describe(obj)
        ));
    };
    check_ndim(name, &owned.shape, ndim, what)?;
    Ok(owned)
}

/// A float32 numpy array (detector outputs are float32 and decoded in float32).
fn read_f32(name: &str, obj: &Bound<'_, PyAny>, ndim: usize, what: &str) -> Result<Owned<f32>, Error> {
    let Ok(a) = obj.cast::<PyArrayDyn<f32>>() else {
        return shape(format!("{name} must be a float32 numpy array ({what}), got {}", describe(obj)));
    };
    let ro = a.readonly();
    let v = ro.as_array();
    let owned = Owned { shape: v.shape().to_vec(), data: v.iter().copied().collect() };
    check_ndim(name, &owned.shape, ndim, what)?;
    Ok(owned)
}

/// An int32 or int64 numpy array as i64.
fn read_i64(name: &str, obj: &Bound<'_, PyAny>, ndim: usize, what: &str) -> Result<Owned<i64>, Error> {
    let owned = if let Ok(a) = obj.cast::<PyArrayDyn<i64>>() {
        let ro = a.readonly();
        let v = ro.as_array();
        Owned { shape: v.shape().to_vec(), data: v.iter().copied().collect() }
    } else if let Ok(a) = obj.cast::<PyArrayDyn<i32>>() {
        let ro = a.readonly();
        let v = ro.as_array();
        Owned { shape: v.shape().to_vec(), data: v.iter().map(|&x| i64::from(x)).collect() }
    } else {
        return shape(format!(
            "{name} must be an int32 or int64 numpy array ({what}), got {}",
            describe(obj)
        ));
    };
    check_ndim(name, &owned.shape, ndim, what)?;
    Ok(owned)
}

/// Row-major (r, c) data as a faer matrix.
fn to_mat(data: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j])
}

fn mat_to_numpy<'py>(py: Python<'py>, m: &Mat<f64>) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut flat = Vec::with_capacity(r * c);
    for i in 0..r {
        flat.extend((0..c).map(|j| m[(i, j)]));
    }
    Ok(numpy::ndarray::Array2::from_shape_vec((r, c), flat)
        .expect("shape matches buffer")
        .into_pyarray(py))
}

// ------------------------------------------------------------------------------ Fréchet

/// Fréchet distance ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2} between N(μ1, Σ1) and
/// N(μ2, Σ2), in float64 (Cholesky of Σ1, else its eigendecomposition; eigenvalues of Lᵀ Σ2 L).
#[pyfunction]
#[pyo3(signature = (mu1, sigma1, mu2, sigma2, *, threads=None))]
fn frechet_distance(
    py: Python<'_>,
    mu1: &Bound<'_, PyAny>,
    sigma1: &Bound<'_, PyAny>,
    mu2: &Bound<'_, PyAny>,
    sigma2: &Bound<'_, PyAny>,
    threads: Option<usize>,
) -> PyResult<f64> {
    let m1 = read_f64("mu1", mu1, 1, "a 1-d mean vector")?;
    let m2 = read_f64("mu2", mu2, 1, "a 1-d mean vector")?;
    let s1 = read_f64("sigma1", sigma1, 2, "a 2-d covariance matrix")?;
    let s2 = read_f64("sigma2", sigma2, 2, "a 2-d covariance matrix")?;
    let par = parallel::parallelism(threads)?;
    detached(py, move || {
        let s1m = to_mat(&s1.data, s1.shape[0], s1.shape[1]);
        let s2m = to_mat(&s2.data, s2.shape[0], s2.shape[1]);
        frechet::frechet_distance(&m1.data, s1m.as_ref(), &m2.data, s2m.as_ref(), par)
            .map(|f| f.distance)
    })
}

/// The thread count the dense kernels use for `threads` (argument, else the
/// RESALIGN_NATIVE_THREADS environment variable, else the built-in default; 0 = all cores).
#[pyfunction]
#[pyo3(signature = (threads=None))]
fn resolve_threads(threads: Option<usize>) -> PyResult<usize> {
    Ok(parallel::resolve_threads(threads)?)
}

// ------------------------------------------------------------------------------ feature statistics

/// Streaming mean and unbiased covariance of feature vectors (float64 state; batches of float32
/// or float64), mergeable across shards: `a.merge(b)` equals one accumulator over both inputs.
#[pyclass(module = "resalign._native", name = "FeatureAccumulator")]
#[derive(Clone)]
struct PyFeatureAccumulator {
    inner: stats::FeatureStats,
}

#[pymethods]
impl PyFeatureAccumulator {
    #[new]
    fn new(dim: usize) -> PyResult<Self> {
        Ok(Self { inner: stats::FeatureStats::new(dim)? })
    }

    /// Feature dimension d.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// Number of feature vectors folded in so far.
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    /// Fold in a (rows, dim) batch of float32 or float64 features.
    #[pyo3(signature = (batch, *, threads=None))]
    fn update(
        mut slf: PyRefMut<'_, Self>,
        batch: &Bound<'_, PyAny>,
        threads: Option<usize>,
    ) -> PyResult<()> {
        let py = slf.py();
        let dim = slf.inner.dim();
        let b = read_f64("batch", batch, 2, &format!("a 2-d (rows, {dim}) feature batch"))?;
        if b.shape[1] != dim {
            return Err(Error::Shape(format!(
                "batch has {} features per row, this accumulator was created with dim={dim}",
                b.shape[1]
            ))
            .into());
        }
        let par = parallel::parallelism(threads)?;
        let mut state = slf.inner.clone();
        let state = detached(py, move || {
            state.update(&b.data, b.shape[0], par)?;
            Ok(state)
        })?;
        slf.inner = state;
        Ok(())
    }

    /// Merge another accumulator's statistics into this one (in place).
    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> PyResult<()> {
        let theirs = other.borrow().inner.clone();
        slf.borrow_mut().inner.merge(&theirs)?;
        Ok(())
    }

    /// Mean vector, shape (dim,).
    fn mean<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.mean().to_vec().into_pyarray(py)
    }

    /// Unbiased covariance (divisor count − 1), shape (dim, dim); needs count ≥ 2.
    fn covariance<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let cov = self.inner.covariance()?;
        mat_to_numpy(py, &cov)
    }

    /// (count, mean, comoment) with comoment = Σ (x − μ)(x − μ)ᵀ; see `from_state`.
    fn state<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(u64, Bound<'py, PyArray1<f64>>, Bound<'py, PyArray2<f64>>)> {
        Ok((self.inner.count(), self.mean(py), mat_to_numpy(py, &self.inner.comoment())?))
    }

    /// Rebuild an accumulator from `state()` (e.g. sent from another process).
    #[staticmethod]
    fn from_state(
        count: u64,
        mean: &Bound<'_, PyAny>,
        comoment: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let m = read_f64("mean", mean, 1, "a 1-d mean vector")?;
        let c = read_f64("comoment", comoment, 2, "a 2-d co-moment matrix")?;
        let cm = to_mat(&c.data, c.shape[0], c.shape[1]);
        Ok(Self { inner: stats::FeatureStats::from_state(count, m.data, cm)? })
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let ctor = slf.get_type().getattr("from_state")?;
        let (count, mean, comoment) = slf.borrow().state(py)?;
        let args = PyTuple::new(py, [count.into_pyobject(py)?.into_any(), mean.into_any(), comoment.into_any()])?;
        Ok((ctor, args))
    }

    fn __repr__(&self) -> String {
        format!("FeatureAccumulator(dim={}, count={})", self.inner.dim(), self.inner.count())
    }
}

// ------------------------------------------------------------------------------ detection

/// Decode + NMS of a batch of YOLOv8 outputs (B, 4 + C, A), exactly as the nudenet package's
/// `_postprocess` for each image. `sizes` is (B, 2) [width, height] of the original images,
/// `pads` (B, 2) [x_pad, y_pad] the bottom/right padding that made each image square.
///
/// Returns (image_index int64 (K,), class_id int64 (K,), score float32 (K,), box int64 (K, 4)),
/// boxes as [x, y, w, h] in original-image pixels, grouped by image in NMS order.
#[pyfunction]
#[pyo3(signature = (output, sizes, pads, *, model_size=(320, 320), conf_threshold=0.2,
                    score_threshold=0.25, iou_threshold=0.45))]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn decode_yolov8<'py>(
    py: Python<'py>,
    output: &Bound<'py, PyAny>,
    sizes: &Bound<'py, PyAny>,
    pads: &Bound<'py, PyAny>,
    model_size: (u32, u32),
    conf_threshold: f32,
    score_threshold: f32,
    iou_threshold: f32,
) -> PyResult<(
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray2<i64>>,
)> {
    let out = read_f32("output", output, 3, "a 3-d (batch, 4 + classes, anchors) array")?;
    let sz = read_i64("sizes", sizes, 2, "a 2-d (batch, 2) array of [width, height]")?;
    let pd = read_i64("pads", pads, 2, "a 2-d (batch, 2) array of [x_pad, y_pad]")?;
    for (name, a) in [("sizes", &sz), ("pads", &pd)] {
        if a.shape[1] != 2 {
            return Err(Error::Shape(format!("{name} must have 2 columns, got shape {:?}", a.shape)).into());
        }
    }
    if sz.shape[0] != pd.shape[0] {
        return Err(Error::Shape(format!(
            "sizes and pads must have the same number of rows, got {} and {}",
            sz.shape[0], pd.shape[0]
        ))
        .into());
    }
    let letterboxes: Vec<detect::Letterbox> = (0..sz.shape[0])
        .map(|i| detect::Letterbox {
            width: sz.data[2 * i],
            height: sz.data[2 * i + 1],
            x_pad: pd.data[2 * i],
            y_pad: pd.data[2 * i + 1],
        })
        .collect();
    let params = detect::DecodeParams {
        model_width: model_size.0,
        model_height: model_size.1,
        conf_threshold,
        score_threshold,
        iou_threshold,
    };
    let shape_bca = [out.shape[0], out.shape[1], out.shape[2]];
    let dets = detached(py, move || {
        detect::decode_yolov8(&out.data, shape_bca, &letterboxes, &params)
    })?;
    let k = dets.len();
    let image: Vec<i64> = dets.iter().map(|d| d.image as i64).collect();
    let class_id: Vec<i64> = dets.iter().map(|d| d.class_id as i64).collect();
    let score: Vec<f32> = dets.iter().map(|d| d.score).collect();
    let boxes: Vec<i64> = dets.iter().flat_map(|d| d.bbox).collect();
    let boxes = numpy::ndarray::Array2::from_shape_vec((k, 4), boxes).expect("k x 4 boxes");
    Ok((
        image.into_pyarray(py),
        class_id.into_pyarray(py),
        score.into_pyarray(py),
        boxes.into_pyarray(py),
    ))
}

// ------------------------------------------------------------------------------ rates

/// (mean, sem, ci_low, ci_high) of per-seed rates: SEM with ddof = 1 (NaN for one value) and
/// the percentile-bootstrap interval of the mean from `n_boot` resamples (xoshiro256** seeded
/// by `seed`; numpy's linear quantile rule).
#[pyfunction]
#[pyo3(signature = (values, *, confidence=0.95, n_boot=10000, seed=0))]
fn rate_summary(
    py: Python<'_>,
    values: &Bound<'_, PyAny>,
    confidence: f64,
    n_boot: usize,
    seed: u64,
) -> PyResult<(f64, f64, f64, f64)> {
    let v = read_f64("values", values, 1, "a 1-d array of rates")?;
    let s = detached(py, move || rates::summarize_rates(&v.data, confidence, n_boot, seed))?;
    Ok((s.mean, s.sem, s.ci_low, s.ci_high))
}

/// The bootstrap means behind `rate_summary` (unsorted, in draw order), for inspection.
#[pyfunction]
#[pyo3(signature = (values, *, n_boot=10000, seed=0))]
fn bootstrap_means<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    n_boot: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let v = read_f64("values", values, 1, "a 1-d array of rates")?;
    if v.data.is_empty() {
        return Err(Error::Shape("values is empty: need at least one rate".into()).into());
    }
    let means = detached(py, move || Ok(rates::bootstrap_means(&v.data, n_boot, seed)))?;
    Ok(means.into_pyarray(py))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("THREADS_ENV", parallel::THREADS_ENV)?;
    m.add("DEFAULT_THREADS", parallel::DEFAULT_THREADS)?;
    m.add_function(wrap_pyfunction!(frechet_distance, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_threads, m)?)?;
    m.add_class::<PyFeatureAccumulator>()?;
    m.add_function(wrap_pyfunction!(decode_yolov8, m)?)?;
    m.add_function(wrap_pyfunction!(rate_summary, m)?)?;
    m.add_function(wrap_pyfunction!(bootstrap_means, m)?)?;
    Ok(())
}
