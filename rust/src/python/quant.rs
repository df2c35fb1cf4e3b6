//! Bindings for `crate::quant`: numpy arrays in and out without copies, the GIL released while
//! the kernels run. bfloat16 / float16 travel as uint16 bit patterns, named by a dtype string.

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::quant::{self, Bf16, FourBitType, F16};

/// `(packed or codes, fp32 scales)` as numpy arrays.
type BytesAndScales<'py> = (Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>);
/// `(CB, SCB)` of row-wise int8 quantisation.
type Int8Rows<'py> = (Bound<'py, PyArray2<i8>>, Bound<'py, PyArray1<f32>>);

/// The three element types the kernels read and write.
#[derive(Clone, Copy)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn parse(name: &str) -> PyResult<Self> {
        match name {
            "float32" => Ok(Dtype::F32),
            "bfloat16" => Ok(Dtype::Bf16),
            "float16" => Ok(Dtype::F16),
            other => Err(PyValueError::new_err(format!(
                "dtype must be 'float32', 'bfloat16' or 'float16', got '{other}'"
            ))),
        }
    }
}

fn slice_of<'a, T: numpy::Element>(
    array: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    super::c_contiguous(array, name)
}

fn u16_input<'py>(input: &Bound<'py, PyAny>, dtype: &str) -> PyResult<PyReadonlyArray1<'py, u16>> {
    input.extract::<PyReadonlyArray1<u16>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{dtype} input must be a 1-D uint16 array of bit patterns"
        ))
    })
}

/// Quantises a flat array to packed 4-bit codes; returns `(packed uint8[ceil(n/2)], absmax float32[blocks])`.
#[pyfunction]
#[pyo3(signature = (input, blocksize, quant_type, dtype))]
fn quantize_4bit<'py>(
    py: Python<'py>,
    input: &Bound<'py, PyAny>,
    blocksize: usize,
    quant_type: &str,
    dtype: &str,
) -> PyResult<BytesAndScales<'py>> {
    let kind = FourBitType::from_name(quant_type)?;
    let (packed, absmax) = match Dtype::parse(dtype)? {
        Dtype::F32 => {
            let arr = input
                .extract::<PyReadonlyArray1<f32>>()
                .map_err(|_| PyValueError::new_err("float32 input must be a 1-D float32 array"))?;
            let data = slice_of(&arr, "input")?;
            py.detach(|| quant::quantize_4bit_f32(data, blocksize, kind))?
        }
        Dtype::Bf16 => {
            let arr = u16_input(input, dtype)?;
            let data = slice_of(&arr, "input")?;
            py.detach(|| quant::quantize_4bit_bf16(data, blocksize, kind))?
        }
        Dtype::F16 => {
            let arr = u16_input(input, dtype)?;
            let data = slice_of(&arr, "input")?;
            py.detach(|| quant::quantize_4bit_f16(data, blocksize, kind))?
        }
    };
    Ok((packed.into_pyarray(py), absmax.into_pyarray(py)))
}

/// Owner of a pooled output buffer: numpy arrays over the buffer keep it as their base object, and
/// when the last of them goes the buffer returns to the pool.
#[pyclass(frozen)]
struct PooledOutput(#[allow(dead_code)] quant::pool::OutputBuffer);

/// Fills a fresh 1-D array of `n` elements of `T` with `fill`, the GIL released. Outputs of a
/// megabyte or more come from `quant::pool` (huge-page-advised, recycled), which saves most of
/// the page faults that otherwise cost more than the kernels themselves.
fn fresh_array<'py, T, F>(py: Python<'py>, n: usize, fill: F) -> PyResult<Bound<'py, PyArray1<T>>>
where
    T: numpy::Element + Send,
    F: FnOnce(&mut [T]) -> crate::Result<()> + Send,
{
    let bytes = n * std::mem::size_of::<T>();
    if bytes < quant::pool::MIN_POOLED_BYTES {
        // SAFETY: every element is written by `fill` before Python sees the array; on error it is dropped.
        let out = unsafe { PyArray1::<T>::new(py, [n], false) };
        {
            let mut guard = out.readwrite();
            let slice = guard.as_slice_mut().expect("a new array is contiguous");
            py.detach(|| fill(slice))?;
        }
        return Ok(out);
    }
    let mut buffer = quant::pool::OutputBuffer::take(bytes)?;
    let ptr = buffer.as_mut_ptr() as *mut T;
    {
        // SAFETY: the buffer holds `bytes` writable bytes, 2 MiB-aligned (so aligned for T), and
        // nothing else refers to them until the array below exists.
        let slice = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
        py.detach(|| fill(slice))?;
    }
    let owner = Bound::new(py, PooledOutput(buffer))?;
    // SAFETY: moving the buffer into `owner` does not move its mapping; the array keeps `owner`
    // (and so the mapping) alive as its base, and every element was written by `fill`.
    Ok(unsafe {
        let view = numpy::ndarray::ArrayView1::from_shape_ptr(n, ptr as *const T);
        PyArray1::borrow_from_array(&view, owner.into_any())
    })
}

/// Sets how many bytes of idle dequantisation outputs the pool keeps for reuse (0 turns the pool
/// off and unmaps what it holds); returns the previous limit.
#[pyfunction]
fn set_output_pool_limit(bytes: usize) -> usize {
    quant::pool::set_pool_limit(bytes)
}

/// Bytes of idle output buffers the pool holds now.
#[pyfunction]
fn output_pool_bytes() -> usize {
    quant::pool::pooled_bytes()
}

fn bits_as<T: quant::Bits16>(out: &mut [u16]) -> &mut [T] {
    quant::as_elements_mut(out)
}

/// Dequantises packed 4-bit codes to `n` values: float32, or uint16 bit patterns for 16-bit dtypes.
/// With `out` (a contiguous 1-D array of that element type and length `n`), writes there and returns it,
/// so a caller that reuses its output buffer pays no page faults for a fresh one.
#[pyfunction]
#[pyo3(signature = (packed, absmax, n, blocksize, quant_type, dtype, out=None))]
#[allow(clippy::too_many_arguments)]
fn dequantize_4bit<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, f32>,
    n: usize,
    blocksize: usize,
    quant_type: &str,
    dtype: &str,
    out: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let kind = FourBitType::from_name(quant_type)?;
    let packed = slice_of(&packed, "packed")?;
    let absmax = slice_of(&absmax, "absmax")?;
    Ok(match Dtype::parse(dtype)? {
        Dtype::F32 => output_array::<f32, _>(py, n, out, |o| {
            quant::dequantize_4bit_into(packed, absmax, n, blocksize, kind, o)
        })?
        .into_any(),
        Dtype::Bf16 => output_array::<u16, _>(py, n, out, |o| {
            quant::dequantize_4bit_into(packed, absmax, n, blocksize, kind, bits_as::<Bf16>(o))
        })?
        .into_any(),
        Dtype::F16 => output_array::<u16, _>(py, n, out, |o| {
            quant::dequantize_4bit_into(packed, absmax, n, blocksize, kind, bits_as::<F16>(o))
        })?
        .into_any(),
    })
}

/// `fill` into the caller's `out` array (checked: element type, contiguity, length) or into a new one.
fn output_array<'py, T, F>(
    py: Python<'py>,
    n: usize,
    out: Option<Bound<'py, PyAny>>,
    fill: F,
) -> PyResult<Bound<'py, PyArray1<T>>>
where
    T: numpy::Element + Send,
    F: FnOnce(&mut [T]) -> crate::Result<()> + Send,
{
    let Some(out) = out else {
        return fresh_array(py, n, fill);
    };
    let array = out.cast_into::<PyArray1<T>>().map_err(|_| {
        PyValueError::new_err(format!(
            "out must be a 1-D {} array",
            std::any::type_name::<T>()
        ))
    })?;
    {
        let mut guard = array.try_readwrite().map_err(|_| {
            PyValueError::new_err("out must be a writeable array not borrowed elsewhere")
        })?;
        let slice = guard
            .as_slice_mut()
            .map_err(|_| PyValueError::new_err("out must be contiguous"))?;
        if slice.len() != n {
            return Err(PyValueError::new_err(format!(
                "out has {} elements, expected {n}",
                slice.len()
            )));
        }
        py.detach(|| fill(slice))?;
    }
    Ok(array)
}

/// Double quantisation of 4-bit block scales; returns `((codes uint8, absmax2 float32), offset)`.
#[pyfunction]
#[pyo3(signature = (absmax, offset=None))]
fn double_quantize_absmax<'py>(
    py: Python<'py>,
    absmax: PyReadonlyArray1<'py, f32>,
    offset: Option<f32>,
) -> PyResult<(BytesAndScales<'py>, f32)> {
    let data = slice_of(&absmax, "absmax")?;
    let nested = py.detach(|| quant::double_quantize_absmax(data, offset))?;
    Ok((
        (
            nested.codes.into_pyarray(py),
            nested.absmax.into_pyarray(py),
        ),
        nested.offset,
    ))
}

/// Recovers fp32 block scales from `(codes, absmax2, offset)`.
#[pyfunction]
fn dequantize_nested_absmax<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    absmax2: PyReadonlyArray1<'py, f32>,
    offset: f32,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let codes = slice_of(&codes, "codes")?;
    let absmax2 = slice_of(&absmax2, "nested absmax")?;
    fresh_array::<f32, _>(py, codes.len(), |o| {
        quant::dequantize_nested_absmax(codes, absmax2, offset, o)
    })
}

/// Row-wise int8 quantisation of a 2-D array; returns `(CB int8 (rows, cols), SCB float32 (rows,))`.
#[pyfunction]
#[pyo3(signature = (input, dtype))]
fn quantize_int8_rows<'py>(
    py: Python<'py>,
    input: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<Int8Rows<'py>> {
    fn run<'py, E: numpy::Element>(
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        f: impl FnOnce(&[E], usize, usize) -> crate::Result<(Vec<i8>, Vec<f32>)> + Send,
    ) -> PyResult<Int8Rows<'py>> {
        let arr = input.extract::<PyReadonlyArray2<E>>().map_err(|_| {
            PyValueError::new_err("int8 input must be a 2-D array (float32, or uint16 bit patterns for 16-bit dtypes)")
        })?;
        let (rows, cols) = (arr.shape()[0], arr.shape()[1]);
        let data = super::c_contiguous(&arr, "int8 input")?;
        let (cb, scb) = py.detach(|| f(data, rows, cols))?;
        let cb = cb.into_pyarray(py).reshape([rows, cols])?;
        Ok((cb, scb.into_pyarray(py)))
    }
    match Dtype::parse(dtype)? {
        Dtype::F32 => run::<f32>(py, input, quant::quantize_int8_rows_f32),
        Dtype::Bf16 => run::<u16>(py, input, quant::quantize_int8_rows_bf16),
        Dtype::F16 => run::<u16>(py, input, quant::quantize_int8_rows_f16),
    }
}

/// `CB * SCB / 127` as a flat array of `rows * cols` values in `dtype`.
#[pyfunction]
#[pyo3(signature = (cb, scb, dtype))]
fn dequantize_int8_rows<'py>(
    py: Python<'py>,
    cb: PyReadonlyArray2<'py, i8>,
    scb: PyReadonlyArray1<'py, f32>,
    dtype: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let (rows, cols) = (cb.shape()[0], cb.shape()[1]);
    let cb = super::c_contiguous(&cb, "CB")?;
    let scb = slice_of(&scb, "SCB")?;
    let n = rows * cols;
    Ok(match Dtype::parse(dtype)? {
        Dtype::F32 => {
            fresh_array::<f32, _>(py, n, |o| quant::dequantize_rows(cb, scb, rows, cols, o))?
                .into_any()
        }
        Dtype::Bf16 => fresh_array::<u16, _>(py, n, |o| {
            quant::dequantize_rows(cb, scb, rows, cols, bits_as::<Bf16>(o))
        })?
        .into_any(),
        Dtype::F16 => fresh_array::<u16, _>(py, n, |o| {
            quant::dequantize_rows(cb, scb, rows, cols, bits_as::<F16>(o))
        })?
        .into_any(),
    })
}

/// The 16 values of a 4-bit type indexed by code (bitsandbytes' `quant_map`).
#[pyfunction]
fn four_bit_code<'py>(py: Python<'py>, quant_type: &str) -> PyResult<Bound<'py, PyArray1<f32>>> {
    Ok(FourBitType::from_name(quant_type)?
        .code()
        .to_vec()
        .into_pyarray(py))
}

/// bitsandbytes' signed 8-bit dynamic map (`nested_quant_map`).
#[pyfunction]
fn dynamic_map(py: Python<'_>) -> Bound<'_, PyArray1<f32>> {
    quant::DYNAMIC_MAP_SIGNED.to_vec().into_pyarray(py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(double_quantize_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_nested_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_int8_rows, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_int8_rows, m)?)?;
    m.add_function(wrap_pyfunction!(four_bit_code, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add_function(wrap_pyfunction!(set_output_pool_limit, m)?)?;
    m.add_function(wrap_pyfunction!(output_pool_bytes, m)?)?;
    Ok(())
}
