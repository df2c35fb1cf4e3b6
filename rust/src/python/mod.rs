//! The pyo3 binding, the only code that knows Python. Each submodule converts arguments for one
//! area of the core, releases the GIL around long work and registers its functions here.

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::Error;

mod checkpoint;
mod config;
mod loftq;
mod pattern;
mod quant;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let message = err.to_string();
        match err {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(message)
            }
            Error::Io { .. } => PyOSError::new_err(message),
            _ => PyValueError::new_err(message),
        }
    }
}

/// An array's elements in row-major order, without a copy. numpy's `as_slice` alone also accepts a
/// Fortran-ordered array, whose memory order is not the row-major order the kernels expect.
pub(crate) fn c_contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    array: &'a numpy::PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    use numpy::PyUntypedArrayMethods;

    let not_c = || PyValueError::new_err(format!("{name} must be a C-contiguous array"));
    if !array.is_c_contiguous() {
        return Err(not_c());
    }
    array.as_slice().map_err(|_| not_c())
}

/// Version of the native core; `oxpeft.__version__` must equal it.
#[pyfunction]
fn version() -> &'static str {
    crate::version()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    config::register(m)?;
    quant::register(m)?;
    loftq::register(m)?;
    checkpoint::register(m)?;
    pattern::register(m)?;
    Ok(())
}
