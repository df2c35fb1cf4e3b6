//! Adapter-config migration for Python: JSON text in, JSON text out, so that the Python side keeps
//! PEFT's own JSON conventions (sorted keys, indent 2) and never needs a second config model.

use pyo3::prelude::*;

use crate::config;

/// Reads a config written by any PEFT release (or oxpeft) into the current schema.
/// Returns the upgraded config as JSON and the notes to show as warnings.
#[pyfunction]
#[pyo3(signature = (config_json, strict = true))]
fn config_upgrade(config_json: &str, strict: bool) -> PyResult<(String, Vec<String>)> {
    let upgraded = config::upgrade(&config::parse(config_json)?, strict)?;
    Ok((upgraded.config.to_string(), upgraded.notes))
}

/// Rewrites a config so that PEFT `target_version` loads it and computes the same thing.
#[pyfunction]
fn config_downgrade(config_json: &str, target_version: &str) -> PyResult<String> {
    Ok(config::downgrade(&config::parse(config_json)?, target_version)?.to_string())
}

/// Who wrote a config, which PEFT releases load it, what it uses: a JSON object.
#[pyfunction]
fn config_inspect(config_json: &str) -> PyResult<String> {
    Ok(config::inspect(&config::parse(config_json)?)?
        .to_json()
        .to_string())
}

/// The `peft_version` oxpeft writes for a config in PEFT `release`'s format (`0.21.2+oxpeft.0.1.0`).
#[pyfunction]
fn config_version_stamp(release: &str) -> PyResult<String> {
    Ok(config::oxpeft_stamp(config::Version::parse(release)?))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(config_upgrade, m)?)?;
    m.add_function(wrap_pyfunction!(config_downgrade, m)?)?;
    m.add_function(wrap_pyfunction!(config_inspect, m)?)?;
    m.add_function(wrap_pyfunction!(config_version_stamp, m)?)?;
    Ok(())
}
