//! Bindings for offline merge / unmerge of adapters into safetensors checkpoints.
//!
//! The work runs on a worker thread (and its rayon pool) while the calling thread, with the GIL
//! released except for a moment per event, forwards per-tensor progress to the Python callback
//! and checks for signals every 100 ms, so that Ctrl-C stops a long merge promptly (Python only
//! delivers signals on its main thread).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::checkpoint::Checkpoint;
use crate::merge::{self, AdapterInput, Digests, MergePlan, Mode, Report};

/// (adapter folder, weights file, weight) as passed from Python.
type PyAdapter = (PathBuf, PathBuf, f64);

/// Total tensor bytes and tensor count of the checkpoint in `path` (validates every shard).
#[pyfunction]
fn checkpoint_size(py: Python<'_>, path: PathBuf) -> PyResult<(u64, usize)> {
    let ck = py.detach(|| Checkpoint::open(&path))?;
    Ok((ck.total_bytes(), ck.num_tensors()))
}

/// Tensor name -> (shape, shard file name) of the checkpoint in `path` (validates every shard; reads headers only).
#[pyfunction]
fn checkpoint_tensors(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<HashMap<String, (Vec<usize>, String)>> {
    let ck = py.detach(|| Checkpoint::open(&path))?;
    let mut out = HashMap::new();
    for shard in ck.shards() {
        let file = shard
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for t in shard.tensors() {
            out.insert(t.name.clone(), (t.shape.clone(), file.clone()));
        }
    }
    Ok(out)
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
    let cancel = AtomicBool::new(false);
    // An exception raised by the callback or a signal handler (KeyboardInterrupt) cancels the run
    // and is re-raised once the worker has stopped.
    let mut raised: Option<PyErr> = None;
    let result = std::thread::scope(|scope| {
        let (cancel, inputs, mode, base, out) = (&cancel, &inputs, &mode, &base, &out);
        let wants_events = progress.is_some();
        let (tx, mut rx): (_, Receiver<(String, u64)>) = channel();
        let worker = scope.spawn(move || -> crate::Result<Report> {
            let ck = Checkpoint::open(base)?;
            let plan = MergePlan::build(&ck, inputs, matches!(mode, Mode::Unmerge { .. }))?;
            // Without a callback no event is sent: the calling thread then only wakes to check
            // for signals, instead of once per tensor (taking the GIL and a core from the pool).
            let report = |name: &str, bytes: u64| -> bool {
                (!wants_events || tx.send((name.to_string(), bytes)).is_ok())
                    && !cancel.load(Ordering::Relaxed)
            };
            merge::run(&ck, &plan, out, mode, &report)
        });
        loop {
            let (back, event) = py.detach(move || {
                let event = rx.recv_timeout(Duration::from_millis(100));
                (rx, event)
            });
            rx = back;
            let outcome = match event {
                Ok((name, bytes)) => match &progress {
                    Some(cb) => cb.call1(py, (name, bytes)).map(drop),
                    None => Ok(()),
                },
                Err(RecvTimeoutError::Timeout) => Ok(()),
                Err(RecvTimeoutError::Disconnected) => break,
            }
            .and_then(|()| py.check_signals());
            if let Err(e) = outcome {
                raised.get_or_insert(e);
                cancel.store(true, Ordering::Relaxed);
            }
        }
        worker.join().expect("the merge worker does not panic")
    });
    if let Some(e) = raised {
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
    if let Some(digests) = &r.digests {
        d.set_item("digests", digests.to_json().to_string())?;
    }
    Ok(d.unbind())
}

/// Merges `adapters` into the checkpoint in `base`, writing its shards into the existing folder
/// `out` (and the exact-unmerge sidecar into `out/oxpeft-unmerge/` when asked, with the digests
/// for its manifest as JSON under "digests"). Nothing is written when an adapter does not fit
/// the base; a non-finite merged element is an error unless `allow_nonfinite`.
#[pyfunction]
#[pyo3(signature = (base, adapters, out, exact_unmerge=true, progress=None, allow_nonfinite=false))]
fn merge_checkpoint(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<PyAdapter>,
    out: PathBuf,
    exact_unmerge: bool,
    progress: Option<Py<PyAny>>,
    allow_nonfinite: bool,
) -> PyResult<Py<PyDict>> {
    run(
        py,
        base,
        adapters,
        out,
        Mode::Merge {
            exact_unmerge,
            allow_nonfinite,
        },
        progress,
    )
}

/// Subtracts `adapters` from the merged checkpoint in `merged`, writing into `out`; with the
/// sidecar folder the result is the original base bit for bit, and with the merge's digests
/// (`digests`: the manifest's JSON object, read from `manifest` for messages) it is checked to be.
#[pyfunction]
#[pyo3(signature = (merged, adapters, out, sidecar=None, progress=None, digests=None, manifest=None))]
#[allow(clippy::too_many_arguments)]
fn unmerge_checkpoint(
    py: Python<'_>,
    merged: PathBuf,
    adapters: Vec<PyAdapter>,
    out: PathBuf,
    sidecar: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
    digests: Option<String>,
    manifest: Option<PathBuf>,
) -> PyResult<Py<PyDict>> {
    let manifest = manifest.unwrap_or_else(|| PathBuf::from("manifest.json"));
    let expected = digests
        .map(|text| {
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                crate::Error::invalid_file(
                    &manifest,
                    format!("field 'digests' is not valid JSON ({e})"),
                )
            })?;
            Digests::from_json(&value, &manifest)
        })
        .transpose()?;
    run(
        py,
        merged,
        adapters,
        out,
        Mode::Unmerge { sidecar, expected },
        progress,
    )
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(checkpoint_size, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(merge_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(unmerge_checkpoint, m)?)?;
    m.add("SIDECAR_DIR", merge::SIDECAR_DIR)?;
    Ok(())
}
