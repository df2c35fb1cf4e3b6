//! Offline merge and unmerge of LoRA adapters into safetensors checkpoints.
//!
//! [`MergePlan::build`] maps every adapter tensor to a base tensor and checks all shapes before
//! anything is written. [`run`] then streams each shard: untouched tensors are copied, changed
//! ones go through a fused kernel that computes `round(float(W) + scaling * B @ A)` in fp32 for a
//! few rows at a time, so no full-size fp32 delta ever exists and the resident memory does not
//! grow with the model. Rows are processed in parallel (rayon), and so are shards.
//!
//! Exact unmerge: while merging, the kernel also replays the unmerge of each element and records
//! the elements whose original bits would not come back (plus DoRA's per-row factors and the
//! originals of replaced tensors) in a sidecar; unmerging with it restores the base bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use regex::Regex;
use serde_json::Value;

use crate::checkpoint::{
    Checkpoint, Dtype, FloatType, SafeTensorsFile, StreamingWriter, TensorInfo, TensorSpec,
};
use crate::{Error, Result};

/// Folder of the exact-unmerge sidecar inside a merged checkpoint. Serving tools that load every
/// `*.safetensors` of a checkpoint folder do not look into sub-folders.
pub const SIDECAR_DIR: &str = "oxpeft-unmerge";
const ADAPTER_PREFIX: &str = "base_model.model.";
const SUFFIX_INDEX: &str = ".oxpeft_unmerge_index";
const SUFFIX_VALUE: &str = ".oxpeft_unmerge_value";
const SUFFIX_DORA: &str = ".oxpeft_dora_factor";
const SUFFIX_ORIGINAL: &str = ".oxpeft_original";
/// Output bytes produced per parallel step; bounds the working memory per shard.
const CHUNK_BYTES: usize = 8 << 20;
/// Rows computed together by the dot-product micro-kernel (they share each load of A).
const ROW_BLOCK: usize = 4;
/// DoRA adapters merged into one tensor at once (their row factors live on the kernel's stack).
const MAX_DORA_TERMS: usize = 8;

/// One adapter to merge: its folder (with `adapter_config.json`), its weights file (normally
/// `adapter_model.safetensors` in that folder) and its weight in the sum.
#[derive(Clone, Debug)]
pub struct AdapterInput {
    pub dir: PathBuf,
    pub weights_file: PathBuf,
    pub weight: f64,
}

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

    fn from_json(cfg: &Value) -> std::result::Result<Self, String> {
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

struct Adapter {
    file: SafeTensorsFile,
}

/// How one adapter changes one base tensor.
#[derive(Clone, Debug)]
enum TermKind {
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
struct Term {
    adapter: usize,
    kind: TermKind,
    scaling: f32,
}

#[derive(Clone, Debug)]
enum Op {
    Add(Vec<Term>),
    /// A modules_to_save tensor: the adapter's copy replaces the base tensor.
    Replace {
        adapter: usize,
        key: String,
    },
}

/// Which adapter tensors change which base tensors, validated against the base checkpoint.
pub struct MergePlan {
    adapters: Vec<Adapter>,
    ops: HashMap<String, Op>,
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

/// What [`run`] does.
pub enum Mode {
    /// Merge, optionally recording the exact-unmerge sidecar.
    Merge { exact_unmerge: bool },
    /// Unmerge; with the sidecar folder of the merged checkpoint the result is bit-exact.
    Unmerge { sidecar: Option<PathBuf> },
}

/// Totals of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub tensors: usize,
    pub tensors_changed: usize,
    pub bytes: u64,
    /// Elements of the changed tensors.
    pub elements_changed: u64,
    /// Merge: elements recorded in the sidecar. Unmerge: elements restored from it.
    pub sidecar_elements: u64,
    pub sidecar_bytes: u64,
}

impl Report {
    fn add(&mut self, o: &Report) {
        self.tensors += o.tensors;
        self.tensors_changed += o.tensors_changed;
        self.bytes += o.bytes;
        self.elements_changed += o.elements_changed;
        self.sidecar_elements += o.sidecar_elements;
        self.sidecar_bytes += o.sidecar_bytes;
    }
}

/// Called after each tensor with its name and byte size; returning `false` cancels the run.
pub type Progress<'a> = &'a (dyn Fn(&str, u64) -> bool + Sync);

/// Writes every shard of `base`, with the plan applied, into the existing folder `out`, under the
/// base's shard names, tensor order, dtypes and metadata. Other files are the caller's business.
pub fn run(
    base: &Checkpoint,
    plan: &MergePlan,
    out: &Path,
    mode: &Mode,
    progress: Progress,
) -> Result<Report> {
    let sidecars: HashMap<String, SafeTensorsFile> = match mode {
        Mode::Unmerge { sidecar: Some(dir) } => base
            .shards()
            .iter()
            .map(shard_name)
            .filter(|n| dir.join(n).is_file())
            .map(|n| {
                let f = SafeTensorsFile::open(dir.join(&n))?;
                Ok((n, f))
            })
            .collect::<Result<_>>()?,
        _ => HashMap::new(),
    };
    // Refuse before writing anything when an unmerge cannot be done.
    if let Mode::Unmerge { sidecar } = mode {
        for (key, op) in &plan.ops {
            let (shard, _) = base.get(key).expect("planned against base");
            let sc = sidecars.get(&shard_name(shard));
            let needs = match op {
                Op::Replace { .. } => Some(format!("{key}{SUFFIX_ORIGINAL}")),
                Op::Add(terms)
                    if terms.iter().any(|t| {
                        matches!(
                            &t.kind,
                            TermKind::LowRank {
                                magnitude: Some(_),
                                ..
                            }
                        )
                    }) =>
                {
                    Some(format!("{key}{SUFFIX_DORA}"))
                }
                Op::Add(_) => None,
            };
            if let Some(needed) = needs {
                if sc.and_then(|f| f.get(&needed)).is_none() {
                    let why = if matches!(op, Op::Replace { .. }) {
                        "was replaced by modules_to_save"
                    } else {
                        "was merged with DoRA, whose row norms"
                    };
                    return Err(Error::tensor(key, format!(
                        "{why} cannot be undone without the exact-unmerge sidecar ({}: missing '{needed}')",
                        sidecar.as_ref().map_or("no sidecar given".to_string(), |d| d.display().to_string())
                    )));
                }
            }
        }
    }
    if matches!(
        mode,
        Mode::Merge {
            exact_unmerge: true
        }
    ) && !plan.ops.is_empty()
    {
        let dir = out.join(SIDECAR_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let reports = base
        .shards()
        .par_iter()
        .map(|shard| {
            let name = shard_name(shard);
            ShardJob {
                shard,
                plan,
                mode,
                sidecar: sidecars.get(&name),
                out: out.join(&name),
                progress,
            }
            .run()
        })
        .collect::<Result<Vec<Report>>>()?;
    let mut total = Report::default();
    reports.iter().for_each(|r| total.add(r));
    Ok(total)
}

fn shard_name(s: &SafeTensorsFile) -> String {
    s.path()
        .file_name()
        .expect("opened by name")
        .to_string_lossy()
        .into_owned()
}

/// A base tensor's change, with the adapter matrices loaded as fp32 in the layout of W.
struct Prepared {
    ft: FloatType,
    rows: usize,
    cols: usize,
    terms: Vec<ReadyTerm>,
}

struct ReadyTerm {
    /// (rows, r): the left factor for W's rows.
    left: Vec<f32>,
    /// (r, cols): the right factor for W's columns.
    right: Vec<f32>,
    r: usize,
    scaling: f32,
    magnitude: Option<Vec<f32>>,
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

fn prepare(plan: &MergePlan, w: &TensorInfo, terms: &[Term]) -> Result<Prepared> {
    let ft = FloatType::of(w.dtype).expect("checked by the plan");
    let (rows, cols) = if w.shape.len() == 2 {
        (w.shape[0], w.shape[1])
    } else {
        (1, w.numel())
    };
    let ready = terms
        .iter()
        .map(|t| {
            let f = &plan.adapters[t.adapter].file;
            Ok(match &t.kind {
                TermKind::LowRank {
                    a,
                    b,
                    transposed,
                    magnitude,
                } => {
                    let (ta, tb) = (f.require(a)?, f.require(b)?);
                    let (r, fan_in, fan_out) = (ta.shape[0], ta.shape[1], tb.shape[0]);
                    let (av, bv) = (f.read_f32(ta)?, f.read_f32(tb)?);
                    // delta^T[i][j] = sum_k A[k][i] B[j][k]: left = A^T, right = B^T, same k order.
                    let (left, right) = if *transposed {
                        (transpose(&av, r, fan_in), transpose(&bv, fan_out, r))
                    } else {
                        (bv, av)
                    };
                    let magnitude = magnitude
                        .as_ref()
                        .map(|m| f.read_f32(f.require(m)?))
                        .transpose()?;
                    ReadyTerm {
                        left,
                        right,
                        r,
                        scaling: t.scaling,
                        magnitude,
                    }
                }
                TermKind::Bias { bias } => ReadyTerm {
                    left: vec![1.0],
                    right: f.read_f32(f.require(bias)?)?,
                    r: 1,
                    scaling: t.scaling,
                    magnitude: None,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if ready.iter().filter(|t| t.magnitude.is_some()).count() > MAX_DORA_TERMS {
        return Err(Error::tensor(
            &w.name,
            format!("more than {MAX_DORA_TERMS} DoRA adapters merged into one tensor"),
        ));
    }
    Ok(Prepared {
        ft,
        rows,
        cols,
        terms: ready,
    })
}

/// Fix-ups recorded for one chunk: flat element indices and original bit patterns.
#[derive(Default)]
struct Fixups {
    index: Vec<u64>,
    bits: Vec<u32>,
    dora: Vec<f32>,
}

struct ShardJob<'a> {
    shard: &'a SafeTensorsFile,
    plan: &'a MergePlan,
    mode: &'a Mode,
    sidecar: Option<&'a SafeTensorsFile>,
    out: PathBuf,
    progress: Progress<'a>,
}

/// Sidecar entries of one shard, spilled to disk while the shard is written.
struct SidecarSpill {
    dir: PathBuf,
    name: String,
    file: File,
    path: PathBuf,
    /// (spec, source): source is a byte range of the spill file or a base tensor to copy.
    entries: Vec<(TensorSpec, SpillSource)>,
    spilled: u64,
}

enum SpillSource {
    Spill(u64, u64),
    Base(String),
}

impl SidecarSpill {
    fn new(dir: PathBuf, name: String) -> Result<Self> {
        let path = dir.join(format!(".{name}.spill"));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(SidecarSpill {
            dir,
            name,
            file,
            path,
            entries: Vec::new(),
            spilled: 0,
        })
    }

    fn spill(&mut self, spec: TensorSpec, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.entries
            .push((spec, SpillSource::Spill(self.spilled, bytes.len() as u64)));
        self.spilled += bytes.len() as u64;
        Ok(())
    }

    /// Writes the sidecar shard (header first) and removes the spill; returns its size.
    fn finish(mut self, base: &SafeTensorsFile) -> Result<u64> {
        let specs: Vec<TensorSpec> = self.entries.iter().map(|e| e.0.clone()).collect();
        let mut meta = serde_json::Map::new();
        meta.insert("format".into(), "oxpeft-exact-unmerge".into());
        let out = self.dir.join(&self.name);
        let mut w = StreamingWriter::create(&out, Some(&meta), &specs)?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        for (_, src) in &self.entries {
            match src {
                SpillSource::Spill(start, len) => {
                    self.file
                        .seek(SeekFrom::Start(*start))
                        .map_err(|e| Error::io(&self.path, e))?;
                    let mut left = *len as usize;
                    while left > 0 {
                        let n = left.min(buf.len());
                        self.file
                            .read_exact(&mut buf[..n])
                            .map_err(|e| Error::io(&self.path, e))?;
                        w.write(&buf[..n])?;
                        left -= n;
                    }
                }
                SpillSource::Base(name) => copy_tensor(base, base.require(name)?, &mut w)?,
            }
        }
        w.finish()?;
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(std::fs::metadata(&out)
            .map_err(|e| Error::io(&out, e))?
            .len())
    }
}

impl Drop for SidecarSpill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copies a tensor unchanged from its file into the writer (in the kernel, without mapping it).
fn copy_tensor(src: &SafeTensorsFile, t: &TensorInfo, w: &mut StreamingWriter) -> Result<()> {
    let before = w.written();
    w.copy_from(&mut src.tensor_reader(t)?)?;
    if w.written() - before != t.nbytes() as u64 {
        return Err(Error::invalid_file(
            src.path(),
            format!("tensor '{}': file shrank while being read", t.name),
        ));
    }
    Ok(())
}

impl ShardJob<'_> {
    fn run(self) -> Result<Report> {
        // Same layout as the base shard, so its header is reused byte for byte.
        let mut writer = StreamingWriter::create_with_header(
            &self.out,
            self.shard.raw_header(),
            self.shard.data_len(),
        )?;
        let mut spill = match self.mode {
            Mode::Merge {
                exact_unmerge: true,
            } if self
                .shard
                .tensors()
                .iter()
                .any(|t| self.plan.ops.contains_key(&t.name)) =>
            {
                let dir = self.out.parent().expect("inside out").join(SIDECAR_DIR);
                Some(SidecarSpill::new(dir, shard_name(self.shard))?)
            }
            _ => None,
        };
        let mut report = Report::default();
        let mut buf = Vec::new();
        for t in self.shard.tensors() {
            match self.plan.ops.get(&t.name) {
                None => copy_tensor(self.shard, t, &mut writer)?,
                Some(Op::Replace { adapter, key }) => {
                    let f = &self.plan.adapters[*adapter].file;
                    self.replace(t, f, f.require(key)?, &mut writer, &mut report)?;
                    if let Some(s) = spill.as_mut() {
                        s.entries.push((
                            TensorSpec {
                                name: format!("{}{SUFFIX_ORIGINAL}", t.name),
                                dtype: t.dtype,
                                shape: t.shape.clone(),
                            },
                            SpillSource::Base(t.name.clone()),
                        ));
                    }
                }
                Some(Op::Add(terms)) => {
                    let p = prepare(self.plan, t, terms)?;
                    self.add(t, &p, &mut buf, &mut writer, spill.as_mut(), &mut report)?;
                }
            }
            report.tensors += 1;
            report.bytes += t.nbytes() as u64;
            if !(self.progress)(&t.name, t.nbytes() as u64) {
                return Err(Error::invalid_argument("cancelled"));
            }
        }
        writer.finish()?;
        if let Some(s) = spill {
            report.sidecar_bytes += s.finish(self.shard)?;
        }
        Ok(report)
    }

    fn replace(
        &self,
        t: &TensorInfo,
        f: &SafeTensorsFile,
        src: &TensorInfo,
        w: &mut StreamingWriter,
        report: &mut Report,
    ) -> Result<()> {
        report.tensors_changed += 1;
        report.elements_changed += t.numel() as u64;
        if let Mode::Unmerge { .. } = self.mode {
            let sc = self.sidecar.expect("checked before writing");
            report.sidecar_elements += t.numel() as u64;
            return copy_tensor(sc, sc.require(&format!("{}{SUFFIX_ORIGINAL}", t.name))?, w);
        }
        if src.dtype == t.dtype {
            return w.write(f.data(src));
        }
        let (from, to) = (
            FloatType::of(src.dtype).expect("planned"),
            FloatType::of(t.dtype).expect("planned"),
        );
        let data = f.data(src);
        let mut out = vec![0u8; t.nbytes()];
        for i in 0..t.numel() {
            to.store_bits(&mut out, i, to.round_bits(from.load(data, i)));
        }
        w.write(&out)
    }

    fn add(
        &self,
        t: &TensorInfo,
        p: &Prepared,
        buf: &mut Vec<u8>,
        w: &mut StreamingWriter,
        spill: Option<&mut SidecarSpill>,
        report: &mut Report,
    ) -> Result<()> {
        report.tensors_changed += 1;
        report.elements_changed += t.numel() as u64;
        let row_bytes = p.cols * p.ft.size();
        let block_bytes = ROW_BLOCK * row_bytes;
        let chunk_rows = (CHUNK_BYTES / block_bytes.max(1)).max(1) * ROW_BLOCK;
        let n_dora = p.terms.iter().filter(|t| t.magnitude.is_some()).count();
        let unmerge = matches!(self.mode, Mode::Unmerge { .. });
        let record = matches!(
            self.mode,
            Mode::Merge {
                exact_unmerge: true
            }
        );

        // Unmerge inputs from the sidecar: DoRA factors and the sorted fix-up list.
        let mut dora_factors: Vec<f32> = Vec::new();
        let mut fix_index: Option<(&[u8], Dtype)> = None;
        let mut fix_value: &[u8] = &[];
        if let (true, Some(sc)) = (unmerge, self.sidecar) {
            if n_dora > 0 {
                let tf = sc.require(&format!("{}{SUFFIX_DORA}", t.name))?;
                if tf.shape != [n_dora, p.rows] {
                    return Err(Error::tensor(
                        &tf.name,
                        format!(
                            "sidecar shape {:?}, expected {:?}",
                            tf.shape,
                            [n_dora, p.rows]
                        ),
                    ));
                }
                dora_factors = sc.read_f32(tf)?;
            }
            if let (Some(ti), Some(tv)) = (
                sc.get(&format!("{}{SUFFIX_INDEX}", t.name)),
                sc.get(&format!("{}{SUFFIX_VALUE}", t.name)),
            ) {
                if ti.shape.len() != 1
                    || tv.shape != ti.shape
                    || tv.dtype != t.dtype
                    || !matches!(ti.dtype, Dtype::U32 | Dtype::I64)
                {
                    return Err(Error::tensor(
                        &ti.name,
                        "sidecar index/value tensors do not match the merged tensor",
                    ));
                }
                fix_index = Some((sc.data(ti), ti.dtype));
                fix_value = sc.data(tv);
            }
        }
        let mut fix_cursor = 0usize;
        let wide_index = t.numel() > u32::MAX as usize;
        let mut spilled_idx: Vec<u8> = Vec::new();
        let mut spilled_val: Vec<u8> = Vec::new();
        let mut n_fix = 0u64;
        let mut factors_out = vec![0f32; if record { n_dora * p.rows } else { 0 }];

        let data = self.shard.data(t);
        for row0 in (0..p.rows).step_by(chunk_rows) {
            let nrows = chunk_rows.min(p.rows - row0);
            let src = &data[row0 * row_bytes..(row0 + nrows) * row_bytes];
            buf.resize(nrows * row_bytes, 0);
            let results: Vec<Fixups> = buf
                .par_chunks_mut(block_bytes)
                .zip(src.par_chunks(block_bytes))
                .enumerate()
                .map_init(
                    || Scratch::new(p),
                    |scratch, (bi, (out, inp))| {
                        let first_row = row0 + bi * ROW_BLOCK;
                        let mut fix = Fixups::default();
                        if unmerge {
                            kernel::unmerge_block(p, first_row, inp, out, &dora_factors, scratch);
                        } else {
                            kernel::merge_block(p, first_row, inp, out, record, scratch, &mut fix);
                        }
                        fix
                    },
                )
                .collect();
            if unmerge {
                if let Some((idx, dt)) = fix_index {
                    let (e0, e1) = ((row0 * p.cols) as u64, ((row0 + nrows) * p.cols) as u64);
                    let n = fix_value.len() / p.ft.size();
                    while fix_cursor < n {
                        let e = match dt {
                            Dtype::U32 => u32::from_le_bytes(
                                idx[4 * fix_cursor..4 * fix_cursor + 4].try_into().unwrap(),
                            ) as u64,
                            _ => u64::from_le_bytes(
                                idx[8 * fix_cursor..8 * fix_cursor + 8].try_into().unwrap(),
                            ),
                        };
                        if e >= e1 {
                            break;
                        }
                        if e < e0 {
                            return Err(Error::tensor(&t.name, "sidecar indices are not sorted"));
                        }
                        let bits = p.ft.load_bits(fix_value, fix_cursor);
                        p.ft.store_bits(buf, (e - e0) as usize, bits);
                        fix_cursor += 1;
                        n_fix += 1;
                    }
                }
            }
            for (bi, fix) in results.iter().enumerate() {
                for (&i, &b) in fix.index.iter().zip(&fix.bits) {
                    if wide_index {
                        spilled_idx.extend_from_slice(&i.to_le_bytes());
                    } else {
                        spilled_idx.extend_from_slice(&(i as u32).to_le_bytes());
                    }
                    let at = spilled_val.len();
                    spilled_val.resize(at + p.ft.size(), 0);
                    p.ft.store_bits(&mut spilled_val[at..], 0, b);
                }
                n_fix += fix.index.len() as u64;
                if record {
                    let block_rows = ROW_BLOCK.min(nrows - bi * ROW_BLOCK);
                    for (d, f) in fix.dora.chunks(block_rows).enumerate() {
                        let at = d * p.rows + row0 + bi * ROW_BLOCK;
                        factors_out[at..at + f.len()].copy_from_slice(f);
                    }
                }
            }
            w.write(buf)?;
            self.shard.release(t, row0 * row_bytes, nrows * row_bytes);
        }
        if unmerge && fix_cursor != fix_value.len() / p.ft.size() {
            return Err(Error::tensor(
                &t.name,
                "sidecar holds indices outside the tensor",
            ));
        }
        if let (true, Some(sc)) = (unmerge, self.sidecar) {
            for suffix in [SUFFIX_INDEX, SUFFIX_VALUE] {
                if let Some(st) = sc.get(&format!("{}{suffix}", t.name)) {
                    sc.release(st, 0, st.nbytes());
                }
            }
        }
        report.sidecar_elements += n_fix;
        if let Some(s) = spill {
            if n_fix > 0 {
                let idx_dtype = if wide_index { Dtype::I64 } else { Dtype::U32 };
                s.spill(
                    TensorSpec {
                        name: format!("{}{SUFFIX_INDEX}", t.name),
                        dtype: idx_dtype,
                        shape: vec![n_fix as usize],
                    },
                    &spilled_idx,
                )?;
                s.spill(
                    TensorSpec {
                        name: format!("{}{SUFFIX_VALUE}", t.name),
                        dtype: t.dtype,
                        shape: vec![n_fix as usize],
                    },
                    &spilled_val,
                )?;
            }
            if n_dora > 0 {
                let bytes: Vec<u8> = factors_out.iter().flat_map(|x| x.to_le_bytes()).collect();
                s.spill(
                    TensorSpec {
                        name: format!("{}{SUFFIX_DORA}", t.name),
                        dtype: Dtype::F32,
                        shape: vec![n_dora, p.rows],
                    },
                    &bytes,
                )?;
            }
        }
        Ok(())
    }
}

/// Per-thread buffers of the kernel: the fp32 accumulator rows and each term's delta rows.
struct Scratch {
    acc: Vec<f32>,
    deltas: Vec<f32>,
}

impl Scratch {
    fn new(p: &Prepared) -> Self {
        Scratch {
            acc: vec![0f32; p.cols],
            deltas: vec![0f32; p.terms.len() * ROW_BLOCK * p.cols],
        }
    }
}

mod kernel {
    //! The fused kernels. `dots` is the hot loop: a register-blocked `left @ right` for a block of
    //! rows, accumulated with fused multiply-adds in k order (as BLAS sgemm does, so fp32 merges
    //! match torch bit for bit), compiled for AVX-512 / AVX2 when the CPU has them. The scaling
    //! is applied afterwards, as PEFT's `(B @ A) * scaling` does.

    use super::{Fixups, Prepared, Scratch, MAX_DORA_TERMS, ROW_BLOCK};
    use crate::checkpoint::FloatType;

    const LANES: usize = 16;

    #[inline(always)]
    fn dots_generic<const NR: usize>(
        left: &[f32],
        right: &[f32],
        r: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        let full = cols / LANES * LANES;
        let mut j = 0;
        while j < full {
            let mut acc = [[0f32; LANES]; NR];
            for k in 0..r {
                let a: &[f32; LANES] = right[k * cols + j..k * cols + j + LANES]
                    .try_into()
                    .unwrap();
                for (rr, acc_row) in acc.iter_mut().enumerate() {
                    let b = left[rr * r + k];
                    for l in 0..LANES {
                        acc_row[l] = b.mul_add(a[l], acc_row[l]);
                    }
                }
            }
            for (rr, acc_row) in acc.iter().enumerate() {
                out[rr * cols + j..rr * cols + j + LANES].copy_from_slice(acc_row);
            }
            j += LANES;
        }
        for j in full..cols {
            for rr in 0..NR {
                let mut s = 0f32;
                for k in 0..r {
                    s = left[rr * r + k].mul_add(right[k * cols + j], s);
                }
                out[rr * cols + j] = s;
            }
        }
    }

    #[inline(always)]
    fn dots_any(left: &[f32], right: &[f32], r: usize, cols: usize, nrows: usize, out: &mut [f32]) {
        match nrows {
            4 => dots_generic::<4>(left, right, r, cols, out),
            3 => dots_generic::<3>(left, right, r, cols, out),
            2 => dots_generic::<2>(left, right, r, cols, out),
            _ => dots_generic::<1>(left, right, r, cols, out),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn dots_avx512(
        left: &[f32],
        right: &[f32],
        r: usize,
        cols: usize,
        nrows: usize,
        out: &mut [f32],
    ) {
        dots_any(left, right, r, cols, nrows, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_avx2(
        left: &[f32],
        right: &[f32],
        r: usize,
        cols: usize,
        nrows: usize,
        out: &mut [f32],
    ) {
        dots_any(left, right, r, cols, nrows, out)
    }

    /// `out[rr][j] = sum_k left[rr][k] * right[k][j]` for `nrows` rows; every path computes the
    /// same correctly rounded FMA chain, so results never depend on the CPU.
    pub fn dots(left: &[f32], right: &[f32], r: usize, cols: usize, nrows: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { dots_avx512(left, right, r, cols, nrows, out) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { dots_avx2(left, right, r, cols, nrows, out) };
            }
        }
        dots_any(left, right, r, cols, nrows, out)
    }

    /// Fills `scratch.deltas` with each term's scaled delta for the rows of this block.
    fn deltas(p: &Prepared, first_row: usize, nrows: usize, scratch: &mut Scratch) {
        let cols = p.cols;
        for (ti, t) in p.terms.iter().enumerate() {
            let d = &mut scratch.deltas[ti * ROW_BLOCK * cols..(ti * ROW_BLOCK + nrows) * cols];
            let left = &t.left[first_row * t.r..(first_row + nrows) * t.r];
            dots(left, &t.right, t.r, cols, nrows, d);
            let s = t.scaling;
            d.iter_mut().for_each(|x| *x *= s);
        }
    }

    /// Where term `ti`'s delta for row `rr` of the block lies in `Scratch::deltas`.
    fn delta_row(cols: usize, ti: usize, rr: usize) -> std::ops::Range<usize> {
        let start = (ti * ROW_BLOCK + rr) * cols;
        start..start + cols
    }

    /// float(src) into `acc`, element by element (written so that it vectorises).
    #[inline(always)]
    fn decode(ft: FloatType, src: &[u8], acc: &mut [f32]) {
        match ft {
            FloatType::BF16 => {
                for (a, c) in acc.iter_mut().zip(src.chunks_exact(2)) {
                    *a = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            FloatType::F16 => {
                for (a, c) in acc.iter_mut().zip(src.chunks_exact(2)) {
                    *a = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            FloatType::F32 => {
                for (a, c) in acc.iter_mut().zip(src.chunks_exact(4)) {
                    *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }

    /// `acc` rounded to `ft` into `dst`.
    #[inline(always)]
    fn encode(ft: FloatType, acc: &[f32], dst: &mut [u8]) {
        let n = ft.size();
        for (a, c) in acc.iter().zip(dst.chunks_exact_mut(n)) {
            let bits = ft.round_bits(*a).to_le_bytes();
            c.copy_from_slice(&bits[..n]);
        }
    }

    /// Applies the terms in order to `acc` (a row of float(W)); `w` is the base row, needed for
    /// DoRA's norm, whose factors go to `factors[di]`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn apply_terms(
        ft: FloatType,
        p: &Prepared,
        deltas: &[f32],
        rr: usize,
        row: usize,
        w: &[u8],
        acc: &mut [f32],
        factors: &mut [[f32; ROW_BLOCK]; MAX_DORA_TERMS],
    ) {
        let mut di = 0;
        for (ti, t) in p.terms.iter().enumerate() {
            let d = &deltas[delta_row(p.cols, ti, rr)];
            if let Some(m) = &t.magnitude {
                // PEFT: the norm is that of the unmerged base row plus this adapter's delta.
                let mut sq = 0f64;
                for (j, dj) in d.iter().enumerate() {
                    let v = (ft.load(w, j) + dj) as f64;
                    sq += v * v;
                }
                let f = m[row] / (sq.sqrt() as f32);
                factors[di][rr] = f;
                di += 1;
                for (a, dj) in acc.iter_mut().zip(d) {
                    *a = f * (*a + dj);
                }
            } else {
                for (a, dj) in acc.iter_mut().zip(d) {
                    *a += dj;
                }
            }
        }
    }

    /// Undoes the terms in reverse order on `acc` (a row of float(W')), as PEFT's unmerge does.
    #[inline(always)]
    fn undo_terms(
        p: &Prepared,
        deltas: &[f32],
        rr: usize,
        acc: &mut [f32],
        factor: impl Fn(usize) -> f32,
    ) {
        let mut di = p.terms.iter().filter(|t| t.magnitude.is_some()).count();
        for (ti, t) in p.terms.iter().enumerate().rev() {
            let d = &deltas[delta_row(p.cols, ti, rr)];
            if t.magnitude.is_some() {
                di -= 1;
                let f = factor(di);
                for (a, dj) in acc.iter_mut().zip(d) {
                    *a = *a / f - dj;
                }
            } else {
                for (a, dj) in acc.iter_mut().zip(d) {
                    *a -= dj;
                }
            }
        }
    }

    /// Records the elements where round(`back`) is not the original `w`.
    #[inline(always)]
    fn record_mismatches(ft: FloatType, back: &[f32], w: &[u8], base_index: u64, fix: &mut Fixups) {
        for (j, x) in back.iter().enumerate() {
            let orig = ft.load_bits(w, j);
            if ft.round_bits(*x) != orig {
                fix.index.push(base_index + j as u64);
                fix.bits.push(orig);
            }
        }
    }

    /// The common case, one plain LoRA term, fused into a single pass per row: W' = round(W + d),
    /// and with `record` the check that round(W' - d) gives W back, per span of 64 elements
    /// (branch-free, so it vectorises; only spans with a miss are scanned for their indices).
    #[inline(always)]
    fn merge_row_single(
        ft: FloatType,
        w: &[u8],
        d: &[f32],
        o: &mut [u8],
        record: bool,
        base_index: u64,
        fix: &mut Fixups,
    ) {
        const SPAN: usize = 64;
        let size = ft.size();
        let mut miss = [0u32; SPAN];
        for (c, ((ws, ds), os)) in w
            .chunks(SPAN * size)
            .zip(d.chunks(SPAN))
            .zip(o.chunks_mut(SPAN * size))
            .enumerate()
        {
            let n = ds.len();
            for j in 0..n {
                let orig = ft.load_bits(ws, j);
                let bits = ft.round_bits(ft.bits_to_f32(orig) + ds[j]);
                ft.store_bits(os, j, bits);
                miss[j] = ft.round_bits(ft.bits_to_f32(bits) - ds[j]) ^ orig;
            }
            if record && miss[..n].iter().fold(0, |a, m| a | m) != 0 {
                for (j, m) in miss[..n].iter().enumerate() {
                    if *m != 0 {
                        fix.index.push(base_index + (c * SPAN + j) as u64);
                        fix.bits.push(ft.load_bits(ws, j));
                    }
                }
            }
        }
    }

    /// Merges one block of rows: W' = round(adapter steps in order on float(W)); with `record`,
    /// replays the unmerge and notes the elements that would not come back.
    pub fn merge_block(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        record: bool,
        scratch: &mut Scratch,
        fix: &mut Fixups,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { merge_block_avx512(p, first_row, inp, out, record, scratch, fix) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { merge_block_avx2(p, first_row, inp, out, record, scratch, fix) };
            }
        }
        merge_block_any(p, first_row, inp, out, record, scratch, fix)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn merge_block_avx512(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        record: bool,
        scratch: &mut Scratch,
        fix: &mut Fixups,
    ) {
        merge_block_any(p, first_row, inp, out, record, scratch, fix)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn merge_block_avx2(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        record: bool,
        scratch: &mut Scratch,
        fix: &mut Fixups,
    ) {
        merge_block_any(p, first_row, inp, out, record, scratch, fix)
    }

    #[inline(always)]
    fn merge_block_any(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        record: bool,
        scratch: &mut Scratch,
        fix: &mut Fixups,
    ) {
        match p.ft {
            FloatType::BF16 => merge_block_t(
                FloatType::BF16,
                p,
                first_row,
                inp,
                out,
                record,
                scratch,
                fix,
            ),
            FloatType::F16 => {
                merge_block_t(FloatType::F16, p, first_row, inp, out, record, scratch, fix)
            }
            FloatType::F32 => {
                merge_block_t(FloatType::F32, p, first_row, inp, out, record, scratch, fix)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn merge_block_t(
        ft: FloatType,
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        record: bool,
        scratch: &mut Scratch,
        fix: &mut Fixups,
    ) {
        let cols = p.cols;
        let row_bytes = cols * ft.size();
        let nrows = inp.len() / row_bytes;
        deltas(p, first_row, nrows, scratch);
        let Scratch { acc, deltas } = scratch;
        let n_dora = p.terms.iter().filter(|t| t.magnitude.is_some()).count();
        let mut factors = [[0f32; ROW_BLOCK]; MAX_DORA_TERMS];
        let single = p.terms.len() == 1 && n_dora == 0;
        for rr in 0..nrows {
            let w = &inp[rr * row_bytes..(rr + 1) * row_bytes];
            let o = &mut out[rr * row_bytes..(rr + 1) * row_bytes];
            if single {
                merge_row_single(
                    ft,
                    w,
                    &deltas[delta_row(cols, 0, rr)],
                    o,
                    record,
                    ((first_row + rr) * cols) as u64,
                    fix,
                );
                continue;
            }
            decode(ft, w, acc);
            apply_terms(ft, p, deltas, rr, first_row + rr, w, acc, &mut factors);
            encode(ft, acc, o);
            if record {
                decode(ft, o, acc);
                undo_terms(p, deltas, rr, acc, |di| factors[di][rr]);
                record_mismatches(ft, acc, w, ((first_row + rr) * cols) as u64, fix);
            }
        }
        for f in &factors[..n_dora] {
            fix.dora.extend_from_slice(&f[..nrows]);
        }
    }

    /// Unmerges one block of rows: W = round(adapter steps undone in reverse on float(W')).
    /// `dora` holds the sidecar's factors as (n_dora, rows).
    pub fn unmerge_block(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        dora: &[f32],
        scratch: &mut Scratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { unmerge_block_avx2(p, first_row, inp, out, dora, scratch) };
            }
        }
        unmerge_block_any(p, first_row, inp, out, dora, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unmerge_block_avx2(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        dora: &[f32],
        scratch: &mut Scratch,
    ) {
        unmerge_block_any(p, first_row, inp, out, dora, scratch)
    }

    #[inline(always)]
    fn unmerge_block_any(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        dora: &[f32],
        scratch: &mut Scratch,
    ) {
        let ft = p.ft;
        let row_bytes = p.cols * ft.size();
        let nrows = inp.len() / row_bytes;
        deltas(p, first_row, nrows, scratch);
        let Scratch { acc, deltas } = scratch;
        for rr in 0..nrows {
            let w = &inp[rr * row_bytes..(rr + 1) * row_bytes];
            let o = &mut out[rr * row_bytes..(rr + 1) * row_bytes];
            match ft {
                FloatType::BF16 => decode(FloatType::BF16, w, acc),
                FloatType::F16 => decode(FloatType::F16, w, acc),
                FloatType::F32 => decode(FloatType::F32, w, acc),
            }
            undo_terms(p, deltas, rr, acc, |di| dora[di * p.rows + first_row + rr]);
            match ft {
                FloatType::BF16 => encode(FloatType::BF16, acc, o),
                FloatType::F16 => encode(FloatType::F16, acc, o),
                FloatType::F32 => encode(FloatType::F32, acc, o),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::f32_to_bf16_bits;

    fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
        let specs: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, _)| TensorSpec {
                name: n.to_string(),
                dtype: *d,
                shape: s.clone(),
            })
            .collect();
        let mut w = StreamingWriter::create(path, None, &specs).unwrap();
        for (_, d, _, v) in tensors {
            let ft = FloatType::of(*d).unwrap();
            let mut b = vec![0u8; v.len() * ft.size()];
            v.iter()
                .enumerate()
                .for_each(|(i, x)| ft.store_bits(&mut b, i, ft.round_bits(*x)));
            w.write(&b).unwrap();
        }
        w.finish().unwrap();
    }

    fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn dots_match_sequential_fma_on_every_path() {
        let (r, cols) = (5, 37);
        let left = rand(4 * r, 1, 2.0);
        let right = rand(r * cols, 2, 2.0);
        for nrows in 1..=4 {
            let mut out = vec![0f32; nrows * cols];
            kernel::dots(&left, &right, r, cols, nrows, &mut out);
            for i in 0..nrows {
                for j in 0..cols {
                    let want =
                        (0..r).fold(0f32, |s, k| left[i * r + k].mul_add(right[k * cols + j], s));
                    assert_eq!(out[i * cols + j].to_bits(), want.to_bits());
                }
            }
        }
    }

    struct Case {
        _dir: tempfile::TempDir,
        base: PathBuf,
        adapter: PathBuf,
    }

    /// A bf16 base with `m.proj` (out 9, in 21) and its bias, and an r=3 adapter with lora_bias.
    fn case(config: &str, a_shape: [usize; 2], dora: bool) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let adapter = dir.path().join("ad");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&adapter).unwrap();
        write_st(
            &base.join("model.safetensors"),
            &[
                ("m.proj.weight", Dtype::BF16, vec![9, 21], rand(189, 3, 0.2)),
                ("m.proj.bias", Dtype::BF16, vec![9], rand(9, 4, 0.2)),
                ("norm.weight", Dtype::F32, vec![21], rand(21, 5, 1.0)),
            ],
        );
        let mut t = vec![
            (
                "base_model.model.m.proj.lora_A.weight",
                Dtype::F32,
                a_shape.to_vec(),
                rand(a_shape[0] * a_shape[1], 6, 1.0),
            ),
            (
                "base_model.model.m.proj.lora_B.weight",
                Dtype::F32,
                vec![9, 3],
                rand(27, 7, 1.0),
            ),
            (
                "base_model.model.m.proj.lora_B.bias",
                Dtype::F32,
                vec![9],
                rand(9, 8, 1.0),
            ),
        ];
        if dora {
            t.push((
                "base_model.model.m.proj.lora_magnitude_vector",
                Dtype::F32,
                vec![9],
                rand(9, 9, 1.0).iter().map(|x| x + 2.0).collect(),
            ));
        }
        write_st(&adapter.join("adapter_model.safetensors"), &t);
        std::fs::write(adapter.join("adapter_config.json"), config).unwrap();
        Case {
            _dir: dir,
            base,
            adapter,
        }
    }

    const CFG: &str = r#"{"peft_type":"LORA","r":3,"lora_alpha":6,"lora_bias":true}"#;

    fn inputs(c: &Case, weight: f64) -> Vec<AdapterInput> {
        vec![AdapterInput {
            dir: c.adapter.clone(),
            weights_file: c.adapter.join("adapter_model.safetensors"),
            weight,
        }]
    }

    fn run_to(c: &Case, from: &Path, name: &str, mode: Mode) -> (PathBuf, Report) {
        let out = from.parent().unwrap().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let ck = Checkpoint::open(from).unwrap();
        let plan =
            MergePlan::build(&ck, &inputs(c, 0.5), matches!(mode, Mode::Unmerge { .. })).unwrap();
        let rep = run(&ck, &plan, &out, &mode, &|_, _| true).unwrap();
        (out, rep)
    }

    #[test]
    fn merge_is_single_rounding_and_unmerge_with_sidecar_is_exact() {
        let c = case(CFG, [3, 21], false);
        let (out, rep) = run_to(
            &c,
            &c.base,
            "merged",
            Mode::Merge {
                exact_unmerge: true,
            },
        );
        assert_eq!((rep.tensors, rep.tensors_changed), (3, 2));
        let base = SafeTensorsFile::open(c.base.join("model.safetensors")).unwrap();
        let ad = SafeTensorsFile::open(c.adapter.join("adapter_model.safetensors")).unwrap();
        let merged = SafeTensorsFile::open(out.join("model.safetensors")).unwrap();
        let w = base
            .read_f32(base.require("m.proj.weight").unwrap())
            .unwrap();
        let a = ad
            .read_f32(ad.require("base_model.model.m.proj.lora_A.weight").unwrap())
            .unwrap();
        let b = ad
            .read_f32(ad.require("base_model.model.m.proj.lora_B.weight").unwrap())
            .unwrap();
        let got = merged.data(merged.require("m.proj.weight").unwrap());
        let s = (6.0f64 / 3.0 * 0.5) as f32;
        for i in 0..9 {
            for j in 0..21 {
                let dot = (0..3).fold(0f32, |acc, k| b[i * 3 + k].mul_add(a[k * 21 + j], acc));
                let want = f32_to_bf16_bits(w[i * 21 + j] + dot * s);
                assert_eq!(FloatType::BF16.load_bits(got, i * 21 + j), want as u32);
            }
        }
        assert_eq!(
            merged.data(merged.require("norm.weight").unwrap()),
            base.data(base.require("norm.weight").unwrap())
        );
        assert!(
            rep.sidecar_elements > 0,
            "a large delta must lose some bf16 bits"
        );

        let (restored, rep2) = run_to(
            &c,
            &out,
            "restored",
            Mode::Unmerge {
                sidecar: Some(out.join(SIDECAR_DIR)),
            },
        );
        assert_eq!(rep2.sidecar_elements, rep.sidecar_elements);
        let bytes = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
        assert_eq!(bytes(&c.base), bytes(&restored));
        let (approx, _) = run_to(&c, &out, "approx", Mode::Unmerge { sidecar: None });
        let ap = SafeTensorsFile::open(approx.join("model.safetensors")).unwrap();
        let differing = (0..189)
            .filter(|&i| {
                FloatType::BF16.load_bits(ap.data(ap.require("m.proj.weight").unwrap()), i)
                    != FloatType::BF16
                        .load_bits(base.data(base.require("m.proj.weight").unwrap()), i)
            })
            .count();
        assert!(differing > 0);
    }

    #[test]
    fn dora_unmerge_needs_and_uses_the_sidecar() {
        let cfg = r#"{"peft_type":"LORA","r":3,"lora_alpha":6,"use_dora":true,"lora_bias":true}"#;
        let c = case(cfg, [3, 21], true);
        let (out, _) = run_to(
            &c,
            &c.base,
            "merged",
            Mode::Merge {
                exact_unmerge: true,
            },
        );
        let merged = Checkpoint::open(&out).unwrap();
        let plan = MergePlan::build(&merged, &inputs(&c, 0.5), true).unwrap();
        let e = run(
            &merged,
            &plan,
            &out,
            &Mode::Unmerge { sidecar: None },
            &|_, _| true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("DoRA") && e.contains("m.proj.weight"), "{e}");
        let (restored, _) = run_to(
            &c,
            &out,
            "restored",
            Mode::Unmerge {
                sidecar: Some(out.join(SIDECAR_DIR)),
            },
        );
        let read = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
        assert_eq!(read(&c.base), read(&restored));
    }

    #[test]
    fn plan_errors_name_both_tensors() {
        let c = case(CFG, [3, 20], false);
        let ck = Checkpoint::open(&c.base).unwrap();
        let e = MergePlan::build(&ck, &inputs(&c, 1.0), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("lora_A.weight") && e.contains("'m.proj.weight'") && e.contains("[9, 21]"),
            "{e}"
        );
        let c = case(r#"{"peft_type":"IA3"}"#, [3, 21], false);
        let e = MergePlan::build(&ck, &inputs(&c, 1.0), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("IA3") && e.contains("adapter_config.json"),
            "{e}"
        );
        let c = case(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":8}"#,
            [3, 21],
            false,
        );
        let e = MergePlan::build(&ck, &inputs(&c, 1.0), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("r=4"), "{e}");
    }

    #[test]
    fn patterns_match_the_end_of_module_names() {
        let cfg: Value = serde_json::from_str(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"use_rslora":true,"rank_pattern":{"q_proj":4,"layers\\.1\\..*v_proj":2},"alpha_pattern":{"v_proj":3}}"#,
        )
        .unwrap();
        let s = LoraSettings::from_json(&cfg).unwrap();
        assert_eq!(
            s.rank_and_scaling("model.layers.0.self_attn.q_proj"),
            (4, 16.0 / 2.0)
        );
        assert_eq!(
            s.rank_and_scaling("model.layers.1.self_attn.v_proj"),
            (2, 3.0 / 2f64.sqrt())
        );
        assert_eq!(
            s.rank_and_scaling("model.layers.0.self_attn.v_proj"),
            (8, 3.0 / 8f64.sqrt())
        );
        assert_eq!(
            s.rank_and_scaling("model.layers.0.self_attn.xq_proj"),
            (8, 16.0 / 8f64.sqrt())
        );
    }
}
