//! Binding for `crate::loftq`: one weight matrix in as a float32 numpy array (read without a copy),
//! the quantised base and the LoRA factors out as numpy arrays that own the Rust buffers.

use numpy::{IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::loftq::{self, LoftqQuant, SvdMode};

type Matrix<'py> = Bound<'py, PyArray2<f32>>;

/// LoftQ-initialise one `(out_features, in_features)` weight; returns
/// `(dequantized (out, in), lora_A (rank, in), lora_B (out, rank), relative error)`, where
/// `dequantized + scaling * lora_B @ lora_A` approximates the weight.
#[pyfunction]
#[pyo3(signature = (weight, rank, iters, scaling, bits = 4, quant_type = "nf4", blocksize = 64, exact_svd = false))]
#[allow(clippy::too_many_arguments)]
fn loftq_init<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    rank: usize,
    iters: usize,
    scaling: f32,
    bits: u32,
    quant_type: &str,
    blocksize: usize,
    exact_svd: bool,
) -> PyResult<(Matrix<'py>, Matrix<'py>, Matrix<'py>, f32)> {
    let weight = matrix(weight, "weight")?;
    let (rows, cols) = (weight.shape()[0], weight.shape()[1]);
    let w = super::c_contiguous(&weight, "LoftQ: weight")?;
    let quant = LoftqQuant::from_bits(bits, quant_type, blocksize)?;
    let svd = if exact_svd {
        SvdMode::Exact
    } else {
        SvdMode::fast()
    };
    let result =
        py.detach(|| loftq::loftq_init_quantized(w, rows, cols, rank, iters, scaling, svd, quant))?;
    Ok((
        result.dequantized.into_pyarray(py).reshape([rows, cols])?,
        result.lora_a.into_pyarray(py).reshape([rank, cols])?,
        result.lora_b.into_pyarray(py).reshape([rows, rank])?,
        result.rel_error,
    ))
}

/// Fit LoRA factors to `weight - dequantized` for a base that is already quantised; returns
/// `(lora_A (rank, in), lora_B (out, rank), relative error)`.
#[pyfunction]
#[pyo3(signature = (weight, dequantized, rank, scaling, exact_svd = false))]
fn loftq_fit_fixed_base<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    dequantized: &Bound<'py, PyAny>,
    rank: usize,
    scaling: f32,
    exact_svd: bool,
) -> PyResult<(Matrix<'py>, Matrix<'py>, f32)> {
    let weight = matrix(weight, "weight")?;
    let base = matrix(dequantized, "dequantized")?;
    let (rows, cols) = (weight.shape()[0], weight.shape()[1]);
    if base.shape() != weight.shape() {
        return Err(PyValueError::new_err(format!(
            "LoftQ: dequantized has shape {:?}, the weight {:?}",
            base.shape(),
            weight.shape()
        )));
    }
    let (w, d) = (
        super::c_contiguous(&weight, "LoftQ: weight")?,
        super::c_contiguous(&base, "LoftQ: dequantized")?,
    );
    let svd = if exact_svd {
        SvdMode::Exact
    } else {
        SvdMode::fast()
    };
    let result = py.detach(|| loftq::loftq_fit_fixed_base(w, d, rows, cols, rank, scaling, svd))?;
    Ok((
        result.lora_a.into_pyarray(py).reshape([rank, cols])?,
        result.lora_b.into_pyarray(py).reshape([rows, rank])?,
        result.rel_error,
    ))
}

fn matrix<'py>(array: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray2<'py, f32>> {
    array
        .extract()
        .map_err(|_| PyValueError::new_err(format!("LoftQ: {name} must be a 2-D float32 array")))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(loftq_init, m)?)?;
    m.add_function(wrap_pyfunction!(loftq_fit_fixed_base, m)?)?;
    Ok(())
}
