//! oxpeft core: the byte-level work of parameter-efficient fine-tuning, on plain slices and paths.
//!
//! Nothing here knows Python except the `python` module, which is compiled only with the
//! `python` feature (maturin enables it; `cargo test` does not).

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod loftq;
pub mod merge;
pub mod pattern;
pub mod quant;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};

/// The crate version, also exposed to Python as `oxpeft._native.version()`.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_semver() {
        let parts: Vec<&str> = super::version().split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()));
    }
}
