//! `BoundedRegex` for Python: user-written patterns matched without the risk of Python `re`'s runaway
//! backtracking (see `crate::pattern`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::pattern;

/// A compiled user pattern. `BoundedRegex(pattern)` raises ValueError for a pattern it cannot compile;
/// `is_match(text)` raises ValueError if a look-around pattern needs more backtracking than allowed.
#[pyclass(frozen, module = "oxpeft._native")]
struct BoundedRegex {
    inner: pattern::BoundedRegex,
}

#[pymethods]
impl BoundedRegex {
    #[new]
    fn new(pattern: &str) -> PyResult<Self> {
        let inner = pattern::BoundedRegex::new(pattern).map_err(PyValueError::new_err)?;
        Ok(Self { inner })
    }

    fn is_match(&self, text: &str) -> PyResult<bool> {
        self.inner.is_match(text).map_err(PyValueError::new_err)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BoundedRegex>()?;
    Ok(())
}
