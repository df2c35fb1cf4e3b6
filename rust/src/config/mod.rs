//! `adapter_config.json` across PEFT releases: read a config that any release (0.3 on, or the 0.1/0.2
//! layout with an explanation) or oxpeft wrote, write one that a chosen older release loads, and tell
//! who wrote a config and which releases load it.
//!
//! The one rule behind every function: a config never silently changes what its adapter computes.
//! A field is dropped only when its value is neutral (`null`, `false`, `{}`, `[]` or the field's
//! default); any other value that cannot be carried over is an error that names the field.

mod table;
mod version;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::{Error, Result};
use table::{Field, Kind, Method, Role, UnknownKeys, ValueFeature};
pub use version::Version;

/// A config in the current schema (every field present, defaults filled, keys sorted).
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub config: Value,
    /// What was dropped, filled or ignored, for the caller to show as warnings.
    pub notes: Vec<String>,
    /// The `peft_version` the config carries, or the release range its fields point to.
    pub written_by: Option<String>,
}

/// One field (or one value of a field) an adapter uses, with the first release that knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Used {
    pub field: String,
    pub value: Value,
    pub since: Version,
}

/// A field oxpeft does not know.
#[derive(Debug, Clone, PartialEq)]
pub struct Unknown {
    pub field: String,
    pub value: Value,
    pub neutral: bool,
}

/// Who wrote a config, which releases load it and what it uses.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub peft_type: String,
    pub written_by: Option<String>,
    /// True when `written_by` comes from the fields present rather than from `peft_version`.
    pub written_by_inferred: bool,
    /// The oldest release that can load the adapter once `downgrade` rewrites its config; `None` when
    /// the config holds a non-neutral field oxpeft does not know.
    pub min_peft_version: Option<Version>,
    /// Releases (of those oxpeft knows) that load the file exactly as it is and compute the same thing.
    pub loads_as_is: Vec<Version>,
    /// Non-default fields and values, oldest first.
    pub features: Vec<Used>,
    pub unknown_fields: Vec<Unknown>,
    pub notes: Vec<String>,
}

/// The newest PEFT release whose config classes this table describes.
pub fn newest_known_release() -> Version {
    *table::RELEASES.last().expect("release table is not empty")
}

/// The oldest release oxpeft writes configs for.
pub fn oldest_writable_release() -> Version {
    table::RELEASES[0]
}

/// `text` for a message: itself if short, else its start and its length.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 80;
    if text.chars().count() <= LIMIT {
        return text.to_string();
    }
    let head: String = text.chars().take(LIMIT - 20).collect();
    format!("{head}... ({} characters)", text.chars().count())
}

/// Reads a config written by any PEFT release or by oxpeft into the current schema.
///
/// Unknown fields with a neutral value are dropped with a note. An unknown field with any other value
/// is an error naming the field and the writer, unless `strict` is false: then it is dropped with a
/// loud warning note, because the adapter may no longer compute what it was trained to compute.
pub fn upgrade(config: &Value, strict: bool) -> Result<Upgraded> {
    let raw = as_object(config)?;
    let mut notes = Vec::new();
    check_legacy_layout(raw, &mut notes)?;
    let method = method_of(raw)?;
    let writer = Writer::detect(raw, method);
    let written_by = writer.describe();

    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    out.insert(
        "peft_type".to_string(),
        Value::String(method.peft_type.to_string()),
    );
    for field in method.fields() {
        let value = match raw.get(field.name) {
            Some(value) => {
                check_value(method, field, value)?;
                value.clone()
            }
            None => {
                if method.required.contains(&field.name) {
                    return Err(Error::Config(format!(
                        "missing required key '{}' in a {} config: it decides what the adapter computes and \
                         has no safe default",
                        field.name, method.peft_type
                    )));
                }
                if writer.release().is_some_and(|r| field.since <= r) && field.role != Role::Meta {
                    missing.push(format!("{}={}", field.name, field.default));
                }
                default_of(field)
            }
        };
        out.insert(field.name.to_string(), value);
    }
    if !missing.is_empty() {
        notes.push(format!(
            "{} writes these fields but they are missing (edited by hand?); filled with their defaults: {}",
            written_by.as_deref().unwrap_or("its writer"),
            missing.join(", ")
        ));
    }

    for (name, raw_value) in raw {
        if name == "peft_type" || method.field(name).is_some() || is_legacy_key(name) {
            continue;
        }
        // A message names the field and shows its value, cut short (a 2 MB value is not echoed).
        let (key, value) = (shorten(name), shorten(&raw_value.to_string()));
        if name == table::RUNTIME_CONFIG {
            notes.push(format!(
                "dropped '{key}': a runtime-only setting that PEFT never saves; pass it when loading instead"
            ));
            continue;
        }
        let writer_text = written_by.as_deref().unwrap_or("an unknown writer");
        if is_neutral(raw_value, None) {
            notes.push(format!(
                "dropped unknown field '{key}' = {value} (written by {writer_text}): its value is neutral, so the \
                 adapter computes the same without it"
            ));
        } else if strict {
            return Err(Error::Config(format!(
                "unknown field '{key}' = {value} in a {} config written by {writer_text}{}: oxpeft knows the fields of \
                 PEFT releases up to {} and cannot tell whether this one changes what the adapter computes. Upgrade \
                 oxpeft, remove the field if you know it is harmless, or load with strict=False to ignore it (the \
                 adapter may then compute something different)",
                method.peft_type,
                writer.newer_than_known_note(),
                newest_known_release()
            )));
        } else {
            notes.push(format!(
                "WARNING: ignoring unknown field '{key}' = {value} (written by {writer_text}) because strict=False: \
                 the adapter may compute something different from what it was trained to compute"
            ));
        }
    }

    Ok(Upgraded {
        config: Value::Object(out.into_iter().collect()),
        notes,
        written_by,
    })
}

/// Rewrites a config so that PEFT `target_version` loads it and computes the same thing.
///
/// Fields the target does not know are dropped when neutral; a non-neutral one (e.g. `use_dora: true`
/// for PEFT 0.8) is an error that lists every such field and the release that added it.
pub fn downgrade(config: &Value, target_version: &str) -> Result<Value> {
    let target = Version::parse(target_version)?;
    if target < oldest_writable_release() {
        return Err(Error::Config(format!(
            "cannot write a config for PEFT {target}: oxpeft writes for PEFT {} and later (0.1/0.2 used a different \
             LoRA layout)",
            oldest_writable_release()
        )));
    }
    let upgraded = upgrade(config, true)?;
    let full = upgraded
        .config
        .as_object()
        .expect("upgrade returns an object");
    let method = method_of(full)?;
    if method.since > target {
        return Err(Error::Config(format!(
            "PEFT {target} has no {} adapters (added in PEFT {})",
            method.peft_type, method.since
        )));
    }

    let mut problems = Vec::new();
    let mut out = BTreeMap::new();
    out.insert(
        "peft_type".to_string(),
        Value::String(method.peft_type.to_string()),
    );
    for field in method.fields() {
        let value = &full[field.name];
        if field.since <= target {
            out.insert(field.name.to_string(), value.clone());
        } else if matters(field, value, full) {
            problems.push(format!(
                "'{}' = {value} needs PEFT >= {} (PEFT {target} does not know it and would load the adapter without it)",
                field.name, field.since
            ));
        }
    }
    for feature in method.value_features() {
        if feature.since > target && feature.matches(&full[feature.field]) {
            problems.push(format!(
                "'{}' = {} needs PEFT >= {}",
                feature.field, full[feature.field], feature.since
            ));
        }
    }
    if let Some((name, since)) = method.list_selectors_since {
        if target < since {
            if let Some(Value::Array(items)) = out.get(name) {
                match items.as_slice() {
                    [single @ Value::String(_)] => {
                        let single = single.clone();
                        out.insert(name.to_string(), single);
                    }
                    _ => problems.push(format!(
                        "'{name}' = {} is a list, which needs PEFT >= {since} (older releases take one string)",
                        Value::Array(items.clone())
                    )),
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::Config(format!(
            "cannot write this {} config for PEFT {target} without changing what the adapter computes: {}. Save \
             for a newer PEFT release, or turn these features off before training",
            method.peft_type,
            problems.join("; ")
        )));
    }
    if target >= Version(0, 18, 0) {
        out.insert(
            "peft_version".to_string(),
            Value::String(oxpeft_stamp(target)),
        );
    }
    Ok(Value::Object(out.into_iter().collect()))
}

/// The `peft_version` oxpeft writes for a config in `release`'s format: the release, with oxpeft's own
/// version as a PEP 440 local label (`0.21.2+oxpeft.0.1.0`). PEFT reads the release part (it parses
/// the field with `packaging`), and `inspect` tells that oxpeft wrote the file.
pub fn oxpeft_stamp(release: Version) -> String {
    format!("{release}{OXPEFT_LABEL}{}", env!("CARGO_PKG_VERSION"))
}

const OXPEFT_LABEL: &str = "+oxpeft.";

/// Tells who wrote a config, which releases load it as it is, the oldest release it can be rewritten
/// for, and which features it uses.
pub fn inspect(config: &Value) -> Result<Inspection> {
    let raw = as_object(config)?;
    let mut upgraded = upgrade(config, false)?;
    let full = upgraded
        .config
        .as_object()
        .expect("upgrade returns an object");
    let method = method_of(raw)?;
    let writer = Writer::detect(raw, method);

    // Which fields are used, and since when; their values are moved out of the upgraded copy
    // afterwards (a 50 MB target_modules list is not copied again).
    let mut used: Vec<(&'static str, Version)> = method
        .fields()
        .into_iter()
        .filter(|field| field.role != Role::Meta && matters(field, &full[field.name], full))
        .map(|field| (field.name, field.since))
        .collect();
    for feature in method.value_features() {
        if feature.matches(&full[feature.field]) {
            match used.iter_mut().find(|f| f.0 == feature.field) {
                Some(existing) => existing.1 = existing.1.max(feature.since),
                None => used.push((feature.field, feature.since)),
            }
        }
    }
    let full = upgraded
        .config
        .as_object_mut()
        .expect("upgrade returns an object");
    let mut features: Vec<Used> = used
        .into_iter()
        .map(|(name, since)| Used {
            field: name.to_string(),
            value: full.get_mut(name).map(Value::take).unwrap_or(Value::Null),
            since,
        })
        .collect();
    if let Some((name, since)) = method.list_selectors_since {
        if let Some(existing) = features.iter_mut().find(|f| f.field == name) {
            if matches!(&existing.value, Value::Array(items) if items.len() > 1) {
                existing.since = existing.since.max(since);
            }
        }
    }
    features.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.field.cmp(&b.field)));

    let unknown_fields: Vec<Unknown> = raw
        .iter()
        .filter(|(key, _)| *key != "peft_type" && method.field(key).is_none())
        .map(|(key, value)| Unknown {
            field: key.clone(),
            value: value.clone(),
            neutral: is_legacy_key(key) || key == table::RUNTIME_CONFIG || is_neutral(value, None),
        })
        .collect();

    let min_peft_version = if unknown_fields.iter().any(|u| !u.neutral) {
        None
    } else {
        Some(
            features
                .iter()
                .map(|f| f.since)
                .fold(method.since.max(oldest_writable_release()), Version::max),
        )
    };

    let loads_as_is = table::RELEASES
        .iter()
        .copied()
        .filter(|&release| loads_unchanged(release, raw, method, &features, &unknown_fields))
        .collect();

    Ok(Inspection {
        peft_type: method.peft_type.to_string(),
        written_by: upgraded.written_by,
        written_by_inferred: !matches!(writer, Writer::Stated(..)),
        min_peft_version,
        loads_as_is,
        features,
        unknown_fields,
        notes: upgraded.notes,
    })
}

impl Inspection {
    /// The inspection as a JSON object; versions as strings, `loads_as_is` also as contiguous ranges.
    pub fn to_json(self) -> Value {
        let used = |u: Used| serde_json::json!({"field": u.field, "value": u.value, "since": u.since.to_string()});
        let mut ranges: Vec<(Version, Version)> = Vec::new();
        let mut last_index = None;
        for release in &self.loads_as_is {
            let index = table::RELEASES.iter().position(|r| r == release);
            match (ranges.last_mut(), last_index, index) {
                (Some(range), Some(prev), Some(i)) if i == prev + 1 => range.1 = *release,
                _ => ranges.push((*release, *release)),
            }
            last_index = index;
        }
        serde_json::json!({
            "peft_type": self.peft_type,
            "written_by": self.written_by,
            "written_by_inferred": self.written_by_inferred,
            "min_peft_version": self.min_peft_version.map(|v| v.to_string()),
            "newest_known_release": newest_known_release().to_string(),
            "loads_as_is": self.loads_as_is.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            "loads_as_is_ranges": ranges.iter().map(|(a, b)| [a.to_string(), b.to_string()]).collect::<Vec<_>>(),
            "features": self.features.into_iter().map(used).collect::<Vec<_>>(),
            "unknown_fields": self.unknown_fields.into_iter().map(|u| serde_json::json!({
                "field": u.field, "value": u.value, "neutral": u.neutral
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }
}

/// Parses config text, turning a syntax error into a config error with its line and column.
pub fn parse(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|err| Error::Config(format!("not valid JSON: {err}")))
}

fn as_object(config: &Value) -> Result<&Map<String, Value>> {
    config
        .as_object()
        .ok_or_else(|| Error::Config(format!("expected a JSON object, got {}", json_type(config))))
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn supported_types() -> String {
    table::METHODS
        .iter()
        .map(|m| m.peft_type)
        .collect::<Vec<_>>()
        .join(", ")
}

fn method_of(config: &Map<String, Value>) -> Result<&'static Method> {
    let peft_type = match config.get("peft_type") {
        None => {
            return Err(Error::Config(format!(
                "missing required key 'peft_type' (which adapter method this is: one of {})",
                supported_types()
            )))
        }
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(Error::Config(format!(
                "'peft_type' must be a string, got {other}"
            )));
        }
    };
    table::METHODS
        .iter()
        .find(|m| m.peft_type == peft_type)
        .ok_or_else(|| {
            Error::Config(format!(
                "unsupported peft_type '{peft_type}': oxpeft reads the configs of {}",
                supported_types()
            ))
        })
}

fn is_legacy_key(key: &str) -> bool {
    key == table::LEGACY_ENABLE_LORA || key == table::LEGACY_MERGE_WEIGHTS
}

/// PEFT 0.1/0.2 wrote `enable_lora` (the fused-projection `MergedLinear` layout) and `merge_weights`.
fn check_legacy_layout(config: &Map<String, Value>, notes: &mut Vec<String>) -> Result<()> {
    if let Some(enable) = config.get(table::LEGACY_ENABLE_LORA) {
        if !enable.is_null() {
            return Err(Error::Config(format!(
                "this config has the PEFT 0.1/0.2 layout with enable_lora = {enable}: each targeted fused projection \
                 (e.g. GPT-2 c_attn) holds one lora_A of rank r*k and a grouped lora_B for the k enabled parts, \
                 which no PEFT release since 0.3 (nor oxpeft) can load. Convert the tensors to one LoRA of rank r*k \
                 per module (lora_B placed block-wise into the rows of the enabled parts, zeros elsewhere), then \
                 remove enable_lora and merge_weights and set r to r*k; or retrain with a current release"
            )));
        }
        notes.push(
            "dropped 'enable_lora' = null: a PEFT 0.1/0.2 key; null means plain per-module LoRA, which is what \
             current releases do"
                .to_string(),
        );
    }
    if let Some(merge) = config.get(table::LEGACY_MERGE_WEIGHTS) {
        notes.push(format!(
            "dropped 'merge_weights' = {merge}: a PEFT 0.1/0.2 training switch that merged the adapter in eval mode; \
             it does not change the saved adapter. Call merge_and_unload() to merge"
        ));
    }
    Ok(())
}

impl Method {
    /// The field of this name, the most derived class's definition winning.
    fn field(&self, name: &str) -> Option<&'static Field> {
        self.groups
            .iter()
            .rev()
            .find_map(|group| group.iter().find(|f| f.name == name))
    }

    /// Every field once, the most derived definition winning, in a stable order.
    fn fields(&self) -> Vec<&'static Field> {
        let mut seen = BTreeMap::new();
        for group in self.groups {
            for field in group.iter() {
                seen.insert(field.name, field);
            }
        }
        seen.into_values().collect()
    }

    fn value_features(&self) -> impl Iterator<Item = &'static ValueFeature> {
        self.values.iter().chain(table::BASE_VALUES.iter())
    }
}

impl ValueFeature {
    fn matches(&self, value: &Value) -> bool {
        match value.as_str() {
            Some(text) if self.prefix => text.starts_with(self.value),
            Some(text) => text.eq_ignore_ascii_case(self.value),
            None => false,
        }
    }
}

fn default_of(field: &Field) -> Value {
    serde_json::from_str(field.default).expect("table defaults are valid JSON")
}

/// JSON equality with numbers compared by value (`8` equals `8.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A value that cannot change what an adapter computes: `null`, `false`, `{}`, `[]` or the field's default.
fn is_neutral(value: &Value, field: Option<&Field>) -> bool {
    let empty = match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        _ => false,
    };
    empty || field.is_some_and(|f| same(value, &default_of(f)))
}

/// Whether dropping this field would change what the adapter computes.
fn matters(field: &Field, value: &Value, config: &Map<String, Value>) -> bool {
    match field.role {
        Role::Meta => false,
        Role::Feature => !is_neutral(value, Some(field)),
        Role::With(other) => {
            !is_neutral(value, Some(field))
                && config.get(other).is_some_and(|v| !is_neutral(v, None))
        }
    }
}

fn check_value(method: &Method, field: &Field, value: &Value) -> Result<()> {
    let required = method.required.contains(&field.name);
    if value.is_null() {
        if required {
            return Err(Error::Config(format!(
                "'{}' is null in a {} config: it decides what the adapter computes and must be set",
                field.name, method.peft_type
            )));
        }
        if field.default == "null" || matches!(field.kind, Kind::Any) {
            return Ok(());
        }
    }
    let ok = match field.kind {
        Kind::Bool => value.is_boolean(),
        Kind::Count => value.as_u64().is_some(),
        Kind::Int => value.as_i64().is_some(),
        Kind::Number => value.is_number(),
        Kind::Str => value.is_string(),
        Kind::OneOf(options) => value.as_str().is_some_and(|s| options.contains(&s)),
        Kind::Modules => {
            value.is_string()
                || value
                    .as_array()
                    .is_some_and(|items| items.iter().all(Value::is_string))
        }
        Kind::Names => value
            .as_array()
            .is_some_and(|items| items.iter().all(Value::is_string)),
        Kind::Object => value.is_object(),
        Kind::Any => true,
    };
    if ok {
        return Ok(());
    }
    let expected = match field.kind {
        Kind::Bool => "true or false".to_string(),
        Kind::Count => "a non-negative integer".to_string(),
        Kind::Int => "an integer".to_string(),
        Kind::Number => "a number".to_string(),
        Kind::Str => "a string".to_string(),
        Kind::OneOf(options) => format!("one of {}", options.join(", ")),
        Kind::Modules => "a regex string or a list of module names".to_string(),
        Kind::Names => "a list of strings".to_string(),
        Kind::Object => "an object".to_string(),
        Kind::Any => unreachable!("Any accepts every value"),
    };
    let nullable = if field.default == "null" {
        " or null"
    } else {
        ""
    };
    Err(Error::Config(format!(
        "field '{}' of a {} config must be {expected}{nullable}, got {value}",
        field.name, method.peft_type
    )))
}

/// Can `release` load this file unchanged and compute what it was trained to compute?
fn loads_unchanged(
    release: Version,
    raw: &Map<String, Value>,
    method: &Method,
    features: &[Used],
    unknown: &[Unknown],
) -> bool {
    if release < method.since || features.iter().any(|f| f.since > release) {
        return false;
    }
    let tolerates_extra_keys = table::unknown_keys(release) != UnknownKeys::Rejected;
    let unknown_ok = unknown.iter().all(|u| u.neutral && tolerates_extra_keys);
    // Known fields the release lacks are harmless (not among the features) but must be tolerated.
    let newer_ok = raw
        .keys()
        .filter_map(|key| method.field(key))
        .all(|field| field.since <= release || tolerates_extra_keys);
    unknown_ok && newer_ok
}

/// Who wrote a config.
enum Writer {
    /// The config says so in `peft_version` (parsed when it reads as a release number).
    Stated(String, Option<Version>),
    /// A complete config of the releases from `.0` up to (not including) `.1`.
    Inferred(Version, Option<Version>),
    /// The 0.1/0.2 layout.
    Legacy,
    /// Not a complete config of any release: written by hand or by another tool.
    Partial,
}

impl Writer {
    fn detect(config: &Map<String, Value>, method: &Method) -> Writer {
        if let Some(Value::String(stated)) = config.get("peft_version") {
            return Writer::Stated(stated.clone(), Version::parse(stated).ok());
        }
        if config.keys().any(|k| is_legacy_key(k)) {
            return Writer::Legacy;
        }
        let fields = method.fields();
        let from = fields
            .iter()
            .filter(|f| config.contains_key(f.name))
            .map(|f| f.since)
            .fold(method.since, Version::max);
        // PEFT writes every field of the dataclass, so a release's config lacks only newer fields.
        let complete = fields
            .iter()
            .all(|f| f.since > from || config.contains_key(f.name) || f.name == "peft_version");
        // Since 0.18 every release fills in `peft_version`, so a newer layout without it is not a release's.
        if !complete || from >= Version(0, 18, 0) {
            return Writer::Partial;
        }
        let before = fields
            .iter()
            .filter(|f| !config.contains_key(f.name) && f.since > from)
            .map(|f| f.since)
            .min();
        Writer::Inferred(from.max(oldest_writable_release()), before)
    }

    fn release(&self) -> Option<Version> {
        match self {
            Writer::Stated(_, parsed) => *parsed,
            _ => None,
        }
    }

    fn describe(&self) -> Option<String> {
        match self {
            Writer::Stated(text, _) => Some(match text.split_once(OXPEFT_LABEL) {
                Some((release, ours)) => format!("oxpeft {ours} (in PEFT {release}'s format)"),
                None => format!("PEFT {text}"),
            }),
            Writer::Legacy => {
                Some("PEFT 0.1/0.2 (inferred from enable_lora/merge_weights)".to_string())
            }
            Writer::Partial => None,
            Writer::Inferred(from, before) => {
                let candidates: Vec<Version> = table::RELEASES
                    .iter()
                    .copied()
                    .filter(|r| r >= from && before.is_none_or(|b| *r < b))
                    .collect();
                let text = match (candidates.first(), candidates.last(), before) {
                    (Some(first), Some(last), Some(_)) if first == last => format!("PEFT {first}"),
                    (Some(first), Some(last), Some(_)) => format!("PEFT {first} to {last}"),
                    (Some(first), _, None) => format!("PEFT {first} or later"),
                    _ => format!("PEFT {from} or later"),
                };
                Some(format!("{text} (inferred from its fields)"))
            }
        }
    }

    fn newer_than_known_note(&self) -> String {
        match self {
            Writer::Stated(_, Some(release)) if *release > newest_known_release() => {
                format!(
                    ", a release newer than the newest oxpeft knows ({})",
                    newest_known_release()
                )
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests;
