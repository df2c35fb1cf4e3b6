//! Bindings for offline merge / unmerge of adapters into safetensors checkpoints. The work runs
//! with the GIL released; the progress callback re-attaches only once per tensor.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::checkpoint::Checkpoint;
use crate::merge::{self, AdapterInput, MergePlan, Mode, Report};

/// (adapter folder, weights file, weight) as passed from Python.
type PyAdapter = (PathBuf, PathBuf, f64);

/// Total tensor bytes and tensor count of the checkpoint in `path` (validates every shard).
#[pyfunction]
fn checkpoint_size(py: Python<'_>, path: PathBuf) -> PyResult<(u64, usize)> {
    let ck = py.detach(|| Checkpoint::open(&path))?;
    Ok((ck.total_bytes(), ck.num_tensors()))
}

fn run(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<PyAdapter>,
    out: PathBuf,
    mode: Mode,
    progress: Option<Py<PyAny>>,
) -> PyResult<Py<PyDict>> {
    let inputs: Vec<AdapterInput> = adapters
        .into_iter()
        .map(|(dir, weights_file, weight)| AdapterInput {
            dir,
            weights_file,
            weight,
        })
        .collect();
    // An exception raised by the callback (e.g. KeyboardInterrupt) stops the run and is re-raised.
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let result = py.detach(|| -> crate::Result<Report> {
        let ck = Checkpoint::open(&base)?;
        let plan = MergePlan::build(&ck, &inputs, matches!(mode, Mode::Unmerge { .. }))?;
        let report = |name: &str, bytes: u64| -> bool {
            let Some(cb) = &progress else { return true };
            Python::attach(|py| match cb.call1(py, (name, bytes)) {
                Ok(_) => true,
                Err(e) => {
                    raised.lock().expect("not poisoned").get_or_insert(e);
                    false
                }
            })
        };
        merge::run(&ck, &plan, &out, &mode, &report)
    });
    if let Some(e) = raised.into_inner().expect("not poisoned") {
        return Err(e);
    }
    let r = result?;
    let d = PyDict::new(py);
    d.set_item("tensors", r.tensors)?;
    d.set_item("tensors_changed", r.tensors_changed)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("elements_changed", r.elements_changed)?;
    d.set_item("sidecar_elements", r.sidecar_elements)?;
    d.set_item("sidecar_bytes", r.sidecar_bytes)?;
    Ok(d.unbind())
}

/// Merges `adapters` into the checkpoint in `base`, writing its shards into the existing folder
/// `out` (and the exact-unmerge sidecar into `out/oxpeft-unmerge/` when asked). Nothing is
/// written when an adapter does not fit the base.
#[pyfunction]
#[pyo3(signature = (base, adapters, out, exact_unmerge=true, progress=None))]
fn merge_checkpoint(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<PyAdapter>,
    out: PathBuf,
    exact_unmerge: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Py<PyDict>> {
    run(
        py,
        base,
        adapters,
        out,
        Mode::Merge { exact_unmerge },
        progress,
    )
}

/// Subtracts `adapters` from the merged checkpoint in `merged`, writing into `out`; with the
/// sidecar folder the result is the original base bit for bit.
#[pyfunction]
#[pyo3(signature = (merged, adapters, out, sidecar=None, progress=None))]
fn unmerge_checkpoint(
    py: Python<'_>,
    merged: PathBuf,
    adapters: Vec<PyAdapter>,
    out: PathBuf,
    sidecar: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Py<PyDict>> {
    run(
        py,
        merged,
        adapters,
        out,
        Mode::Unmerge { sidecar },
        progress,
    )
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(checkpoint_size, m)?)?;
    m.add_function(wrap_pyfunction!(merge_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(unmerge_checkpoint, m)?)?;
    m.add("SIDECAR_DIR", merge::SIDECAR_DIR)?;
    Ok(())
}
