//! PEFT release numbers as written in `peft_version` or asked for by a user ("0.10", "0.18.1",
//! "0.19.0.dev0@1a2b3c").

use std::fmt;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    /// Reads the leading `major.minor[.patch]` of a version string; any suffix (`.dev0`, `rc1`,
    /// `@commit`, `+local`) is ignored because configs only differ between releases.
    pub fn parse(text: &str) -> Result<Version> {
        let bad = || {
            Error::Config(format!(
                "'{text}' is not a PEFT version (expected e.g. 0.10.0)"
            ))
        };
        let mut parts = [0u16; 3];
        let mut count = 0;
        for piece in text.trim().split('.') {
            let digits: String = piece.chars().take_while(|c| c.is_ascii_digit()).collect();
            if digits.is_empty() || count == 3 {
                break;
            }
            parts[count] = digits.parse().map_err(|_| bad())?;
            count += 1;
            if digits.len() != piece.len() {
                break;
            }
        }
        if count < 2 {
            return Err(bad());
        }
        Ok(Version(parts[0], parts[1], parts[2]))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::Version;

    #[test]
    fn parses_releases_and_dev_builds() {
        assert_eq!(Version::parse("0.10.0").unwrap(), Version(0, 10, 0));
        assert_eq!(Version::parse("0.10").unwrap(), Version(0, 10, 0));
        assert_eq!(
            Version::parse("0.19.0.dev0@1a2b3c").unwrap(),
            Version(0, 19, 0)
        );
        assert_eq!(Version::parse("0.18.1rc1").unwrap(), Version(0, 18, 1));
        assert_eq!(Version::parse(" 0.21.2 ").unwrap(), Version(0, 21, 2));
        assert!(Version(0, 9, 0) < Version(0, 10, 0));
    }

    #[test]
    fn rejects_non_versions() {
        for text in ["", "latest", "0", "v0.10", ".10"] {
            assert!(Version::parse(text).is_err(), "{text}");
        }
    }
}
