//! The merge plan: which adapter tensors change which base tensors, read from the adapters'
//! configs and files and checked against the base checkpoint before anything is written.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::{AdapterInput, ADAPTER_PREFIX};
use crate::checkpoint::{Checkpoint, FloatType, SafeTensorsFile, TensorInfo};
use crate::{Error, Result};

/// The LoRA settings the merge depends on, read from `adapter_config.json`.
#[derive(Debug)]
pub struct LoraSettings {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
}

impl LoraSettings {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid_file(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&cfg).map_err(|e| Error::invalid_file(path, e))
    }

    pub(super) fn from_json(cfg: &Value) -> std::result::Result<Self, String> {
        let peft_type = cfg
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("<missing>");
        if peft_type != "LORA" {
            return Err(format!(
                "peft_type '{peft_type}' cannot be merged by oxpeft (only LORA adapters)"
            ));
        }
        let set = |k: &str| {
            cfg.get(k).is_some_and(|v| {
                !(v.is_null()
                    || v == &Value::Bool(false)
                    || v.as_array().is_some_and(|a| a.is_empty()))
            })
        };
        for unsupported in [
            "layer_replication",
            "use_qalora",
            "target_parameters",
            "trainable_token_indices",
            "alora_invocation_tokens",
            "use_bdlora",
        ] {
            if set(unsupported) {
                return Err(format!(
                    "'{unsupported}' is set; merging such adapters is not supported"
                ));
            }
        }
        let r = cfg
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or("'r' must be a positive integer")? as usize;
        let lora_alpha = cfg
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or("'lora_alpha' must be a number")?;
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        let pattern = |k: &str| -> std::result::Result<Vec<(Regex, f64)>, String> {
            let Some(map) = cfg.get(k).and_then(Value::as_object) else {
                return Ok(Vec::new());
            };
            map.iter()
                .map(|(key, v)| {
                    let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                        .map_err(|e| format!("'{k}' key '{key}' is not a supported regex: {e}"))?;
                    let val = v
                        .as_f64()
                        .ok_or_else(|| format!("'{k}' value for '{key}' is not a number"))?;
                    Ok((re, val))
                })
                .collect()
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(re, v)| {
                if v >= 1.0 && v.fract() == 0.0 {
                    Ok((re, v as usize))
                } else {
                    Err(format!("rank_pattern value {v} is not a positive integer"))
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(LoraSettings {
            r,
            lora_alpha,
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
            fan_in_fan_out: flag("fan_in_fan_out"),
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// Rank and scaling of `module` (PEFT: the first pattern key whose regex matches the end of
    /// the module name wins, else the config-wide value).
    pub fn rank_and_scaling(&self, module: &str) -> (usize, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map_or(self.r, |p| p.1);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |p| p.1);
        let scaling = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scaling)
    }
}

pub(super) struct Adapter {
    pub(super) file: SafeTensorsFile,
}

/// How one adapter changes one base tensor.
#[derive(Clone, Debug)]
pub(super) enum TermKind {
    /// `B @ A` (or its transpose for fan_in_fan_out / embeddings), times the scaling.
    LowRank {
        a: String,
        b: String,
        transposed: bool,
        magnitude: Option<String>,
    },
    /// `lora_B.bias` times the scaling, added to the base bias.
    Bias { bias: String },
}

#[derive(Clone, Debug)]
pub(super) struct Term {
    pub(super) adapter: usize,
    pub(super) kind: TermKind,
    pub(super) scaling: f32,
}

#[derive(Clone, Debug)]
pub(super) enum Op {
    Add(Vec<Term>),
    /// A modules_to_save tensor: the adapter's copy replaces the base tensor.
    Replace {
        adapter: usize,
        key: String,
    },
}

/// Which adapter tensors change which base tensors, validated against the base checkpoint.
pub struct MergePlan {
    pub(super) adapters: Vec<Adapter>,
    pub(super) ops: HashMap<String, Op>,
}

#[derive(Default)]
struct ModuleKeys {
    a: Option<String>,
    b: Option<String>,
    bias: Option<String>,
    magnitude: Option<String>,
    embedding: bool,
}

impl MergePlan {
    /// Plans merging `inputs` into `base`. With `merged` the base already holds them (unmerge);
    /// base-layer copies saved with an adapter are then not compared with it.
    pub fn build(base: &Checkpoint, inputs: &[AdapterInput], merged: bool) -> Result<Self> {
        if inputs.is_empty() {
            return Err(Error::invalid_argument("no adapters given"));
        }
        let mut ops: HashMap<String, Op> = HashMap::new();
        let mut adapters = Vec::with_capacity(inputs.len());
        for (ai, input) in inputs.iter().enumerate() {
            if !input.weight.is_finite() {
                return Err(Error::invalid_argument(format!(
                    "weight {} of adapter {} is not finite",
                    input.weight,
                    input.dir.display()
                )));
            }
            let settings = LoraSettings::read(&input.dir.join("adapter_config.json"))?;
            let file = SafeTensorsFile::open(&input.weights_file)?;
            let fpath = file.path().to_path_buf();
            let ctx = |key: &str, reason: String| {
                Error::invalid_file(&fpath, format!("tensor '{key}': {reason}"))
            };

            let mut modules: BTreeMap<String, ModuleKeys> = BTreeMap::new();
            for t in file.tensors() {
                let rest = t.name.strip_prefix(ADAPTER_PREFIX).ok_or_else(|| {
                    ctx(&t.name, format!("does not start with '{ADAPTER_PREFIX}'"))
                })?;
                let (module, field) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                    (m.to_string(), "a")
                } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                    (m.to_string(), "b")
                } else if let Some(m) = rest.strip_suffix(".lora_B.bias") {
                    (m.to_string(), "bias")
                } else if let Some(m) = rest
                    .strip_suffix(".lora_magnitude_vector")
                    .or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"))
                {
                    (m.to_string(), "magnitude")
                } else if let Some(m) = rest.strip_suffix(".lora_embedding_A") {
                    (m.to_string(), "emb_a")
                } else if let Some(m) = rest.strip_suffix(".lora_embedding_B") {
                    (m.to_string(), "emb_b")
                } else if let Some(m) = rest.strip_suffix(".base_layer.weight") {
                    if !merged {
                        check_saved_base_layer(base, &file, t, &format!("{m}.weight"))?;
                    }
                    continue;
                } else if rest.contains(".lora_") {
                    return Err(ctx(
                        &t.name,
                        "is a kind of LoRA tensor oxpeft cannot merge".into(),
                    ));
                } else {
                    plan_replace(base, &mut ops, ai, &file, t, rest)?;
                    continue;
                };
                let keys = modules.entry(module).or_default();
                let name = Some(t.name.clone());
                match field {
                    "a" => keys.a = name,
                    "b" => keys.b = name,
                    "bias" => keys.bias = name,
                    "magnitude" => keys.magnitude = name,
                    "emb_a" => (keys.a, keys.embedding) = (name, true),
                    _ => (keys.b, keys.embedding) = (name, true),
                }
            }

            for (module, keys) in &modules {
                let (Some(a), Some(b)) = (&keys.a, &keys.b) else {
                    return Err(ctx(module, "module has only one of lora_A / lora_B".into()));
                };
                let (ta, tb) = (file.require(a)?, file.require(b)?);
                let (r, scaling) = settings.rank_and_scaling(module);
                let scaling = (scaling * input.weight) as f32;
                if ta.shape.len() != 2 || tb.shape.len() != 2 || ta.shape[0] != tb.shape[1] {
                    return Err(ctx(
                        a,
                        format!(
                            "shape {:?} does not pair with {} of shape {:?}",
                            ta.shape, b, tb.shape
                        ),
                    ));
                }
                if ta.shape[0] != r {
                    return Err(ctx(
                        a,
                        format!(
                            "has rank {} but adapter_config.json gives r={r} for module '{module}'",
                            ta.shape[0]
                        ),
                    ));
                }
                for t in [ta, tb] {
                    if FloatType::of(t.dtype).is_none() {
                        return Err(ctx(
                            &t.name,
                            format!("dtype {} is not a float type", t.dtype.as_str()),
                        ));
                    }
                }
                let weight_key = format!("{module}.weight");
                let (_, w) = base.get(&weight_key).ok_or_else(|| {
                    ctx(
                        a,
                        format!(
                            "no base tensor '{weight_key}' in {} to merge into",
                            base.dir().display()
                        ),
                    )
                })?;
                // The stored layout of W: (out, in) for Linear, (in, out) for Conv1D (fan_in_fan_out)
                // and (num_embeddings, dim) for embeddings, whose delta is (B @ A) transposed.
                let transposed = keys.embedding || settings.fan_in_fan_out;
                let (fan_in, fan_out) = (ta.shape[1], tb.shape[0]);
                let expect = if transposed {
                    [fan_in, fan_out]
                } else {
                    [fan_out, fan_in]
                };
                if w.shape != expect {
                    return Err(ctx(a, format!(
                        "with {b} makes a delta of shape {expect:?} but base tensor '{weight_key}' has shape {:?}",
                        w.shape
                    )));
                }
                if FloatType::of(w.dtype).is_none() {
                    return Err(ctx(
                        a,
                        format!(
                            "base tensor '{weight_key}' has dtype {}, not BF16/F16/F32",
                            w.dtype.as_str()
                        ),
                    ));
                }
                if keys.magnitude.is_some() != settings.use_dora {
                    return Err(ctx(
                        module,
                        format!(
                            "use_dora is {} but the magnitude vector is {}",
                            settings.use_dora,
                            if keys.magnitude.is_some() {
                                "present"
                            } else {
                                "missing"
                            }
                        ),
                    ));
                }
                if let Some(m) = &keys.magnitude {
                    if transposed {
                        return Err(ctx(
                            m,
                            "DoRA on fan_in_fan_out or embedding layers is not supported".into(),
                        ));
                    }
                    let tm = file.require(m)?;
                    if tm.numel() != fan_out || FloatType::of(tm.dtype).is_none() {
                        return Err(ctx(
                            m,
                            format!(
                                "shape {:?} {} does not match out_features {fan_out}",
                                tm.shape,
                                tm.dtype.as_str()
                            ),
                        ));
                    }
                }
                let kind = TermKind::LowRank {
                    a: a.clone(),
                    b: b.clone(),
                    transposed,
                    magnitude: keys.magnitude.clone(),
                };
                add_term(
                    &mut ops,
                    &weight_key,
                    Term {
                        adapter: ai,
                        kind,
                        scaling,
                    },
                )?;
                if let Some(bias) = &keys.bias {
                    let bias_key = format!("{module}.bias");
                    let tbias = file.require(bias)?;
                    let (_, wb) = base.get(&bias_key).ok_or_else(|| {
                        ctx(
                            bias,
                            format!("lora_bias needs a base tensor '{bias_key}', which is missing"),
                        )
                    })?;
                    if tbias.numel() != fan_out
                        || wb.numel() != fan_out
                        || FloatType::of(tbias.dtype).is_none()
                        || FloatType::of(wb.dtype).is_none()
                    {
                        return Err(ctx(
                            bias,
                            format!(
                                "shape {:?} does not match base '{bias_key}' of shape {:?}",
                                tbias.shape, wb.shape
                            ),
                        ));
                    }
                    add_term(
                        &mut ops,
                        &bias_key,
                        Term {
                            adapter: ai,
                            kind: TermKind::Bias { bias: bias.clone() },
                            scaling,
                        },
                    )?;
                }
            }
            adapters.push(Adapter { file });
        }
        Ok(MergePlan { adapters, ops })
    }
}

fn add_term(ops: &mut HashMap<String, Op>, key: &str, term: Term) -> Result<()> {
    match ops
        .entry(key.to_string())
        .or_insert_with(|| Op::Add(Vec::new()))
    {
        Op::Add(terms) => {
            terms.push(term);
            Ok(())
        }
        Op::Replace { .. } => Err(Error::tensor(
            key,
            "is both replaced (modules_to_save) and changed by LoRA",
        )),
    }
}

/// PEFT saves the frozen base weight of a targeted embedding (`save_embedding_layers`) with the
/// adapter and loads it over the base's. A copy equal to the base is a no-op; a different one
/// (e.g. a resized vocabulary) is refused rather than silently merged against the wrong matrix.
fn check_saved_base_layer(
    base: &Checkpoint,
    file: &SafeTensorsFile,
    t: &TensorInfo,
    key: &str,
) -> Result<()> {
    let bad =
        |reason: String| Error::invalid_file(file.path(), format!("tensor '{}': {reason}", t.name));
    let (bf, w) = base
        .get(key)
        .ok_or_else(|| bad(format!("saved base layer has no base tensor '{key}'")))?;
    let (Some(from), Some(to)) = (FloatType::of(t.dtype), FloatType::of(w.dtype)) else {
        return Err(bad(format!(
            "dtypes {} / {} are not float types",
            t.dtype.as_str(),
            w.dtype.as_str()
        )));
    };
    let (saved, orig) = (file.data(t), bf.data(w));
    let same = w.shape == t.shape
        && (0..w.numel()).all(|i| to.round_bits(from.load(saved, i)) == to.load_bits(orig, i));
    bf.release(w, 0, w.nbytes());
    if !same {
        return Err(bad(format!("differs from base tensor '{key}' (resized or retrained base layer); merging it is not supported")));
    }
    Ok(())
}

fn plan_replace(
    base: &Checkpoint,
    ops: &mut HashMap<String, Op>,
    ai: usize,
    file: &SafeTensorsFile,
    t: &TensorInfo,
    key: &str,
) -> Result<()> {
    let bad =
        |reason: String| Error::invalid_file(file.path(), format!("tensor '{}': {reason}", t.name));
    let (_, w) = base
        .get(key)
        .ok_or_else(|| bad(format!("modules_to_save tensor has no base tensor '{key}'")))?;
    if w.shape != t.shape {
        return Err(bad(format!(
            "shape {:?} differs from base tensor '{key}' of shape {:?}",
            t.shape, w.shape
        )));
    }
    if w.dtype != t.dtype && (FloatType::of(w.dtype).is_none() || FloatType::of(t.dtype).is_none())
    {
        return Err(bad(format!(
            "dtype {} cannot be stored as the base's {}",
            t.dtype.as_str(),
            w.dtype.as_str()
        )));
    }
    if ops
        .insert(
            key.to_string(),
            Op::Replace {
                adapter: ai,
                key: t.name.clone(),
            },
        )
        .is_some()
    {
        return Err(bad(format!(
            "base tensor '{key}' is already changed by another adapter tensor"
        )));
    }
    Ok(())
}
