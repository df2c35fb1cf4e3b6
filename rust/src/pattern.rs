//! Regular expressions written by users (`target_modules`, `rank_pattern`, `alpha_pattern`, ...), matched in
//! bounded time.
//!
//! Python's `re` backtracks: `(.+)+X` against a 60-character module name runs for hours. Here a pattern without
//! look-around or back-references runs on the `regex` crate's automata, linear in the text; one with them (PEFT
//! users write `^(?!.*vision).*q_proj$`) backtracks with a step budget, and running out of it is an error that
//! names the pattern, never a hang.

use fancy_regex::{Regex, RegexBuilder};

/// Backtracking steps one match may take before it is refused (fancy-regex's default is 1,000,000).
pub const BACKTRACK_LIMIT: usize = 1_000_000;

/// Compiled programs larger than this are refused (a 300k-alternative pattern, say), in bytes.
const SIZE_LIMIT: usize = 64 << 20;

#[derive(Debug)]
pub struct BoundedRegex {
    re: Regex,
}

impl BoundedRegex {
    /// Compiles `pattern` as given (the caller adds anchors). The error says why, in one line.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let re = RegexBuilder::new(pattern)
            .backtrack_limit(BACKTRACK_LIMIT)
            .delegate_size_limit(SIZE_LIMIT)
            .delegate_dfa_size_limit(SIZE_LIMIT)
            .build()
            .map_err(|e| one_line(&e.to_string()))?;
        Ok(Self { re })
    }

    /// Whether the pattern matches somewhere in `text`; an error if it needs more backtracking than allowed.
    pub fn is_match(&self, text: &str) -> Result<bool, String> {
        self.re.is_match(text).map_err(|e| one_line(&e.to_string()))
    }
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn plain_patterns_match_like_python_fullmatch() {
        let re = BoundedRegex::new(r"^(?:.*\.(q|v)_proj)$").unwrap();
        assert!(re.is_match("model.layers.0.self_attn.q_proj").unwrap());
        assert!(!re.is_match("model.layers.0.self_attn.k_proj").unwrap());
    }

    #[test]
    fn catastrophic_patterns_finish_at_once() {
        let name = "a".repeat(5000);
        let start = Instant::now();
        let re = BoundedRegex::new(r"^(?:(.+)+X)$").unwrap();
        assert!(!re.is_match(&name).unwrap());
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn look_around_works_and_runaway_patterns_end_quickly() {
        let re = BoundedRegex::new(r"^(?:(?!.*vision).*q_proj)$").unwrap();
        assert!(re.is_match("model.language_model.layers.0.q_proj").unwrap());
        assert!(!re.is_match("model.vision_tower.layers.0.q_proj").unwrap());
        // Exponential patterns with look-around or back-references end quickly: answered (the parts without
        // them run on automata) or refused when the backtracking budget runs out, never a hang.
        for pattern in [
            r"^(?:(?=(a+)+b).*)$",
            r"^(?:(a|aa)+\1(?=c)c)$",
            r"^(?:((a+)+)\2x)$",
        ] {
            let re = BoundedRegex::new(pattern).unwrap();
            let start = Instant::now();
            match re.is_match(&"a".repeat(40)) {
                Ok(matched) => assert!(!matched, "{pattern}"),
                Err(err) => assert!(err.to_lowercase().contains("backtrack"), "{pattern}: {err}"),
            }
            assert!(start.elapsed() < Duration::from_secs(5), "{pattern}");
        }
    }

    #[test]
    fn bad_patterns_say_why_in_one_line() {
        let err = BoundedRegex::new("([").unwrap_err();
        assert!(!err.contains('\n') && !err.is_empty(), "{err}");
    }
}
