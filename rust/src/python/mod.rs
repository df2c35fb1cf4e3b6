//! The pyo3 binding, the only code that knows Python. Each submodule converts arguments for one
//! area of the core, releases the GIL around long work and registers its functions here.

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::Error;

mod config;
mod quant;
mod checkpoint;

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
    checkpoint::register(m)?;
    Ok(())
}
