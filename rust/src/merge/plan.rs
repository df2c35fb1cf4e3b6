//! The merge plan: which adapter tensors change which base tensors, read from the adapters'
//! configs and files and checked against the base checkpoint before anything is written.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::{AdapterInput, ADAPTER_PREFIX};
use crate::checkpoint::{Checkpoint, FloatType, SafeTensorsFile, TensorInfo};
use crate::{Error, Result};

/// The PEFT methods whose adapters merge offline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Lora,
    Ia3,
    LoHa,
    LoKr,
}

impl Method {
    fn from_peft_type(peft_type: &str) -> Option<Self> {
        Some(match peft_type {
            "LORA" => Method::Lora,
            "IA3" => Method::Ia3,
            "LOHA" => Method::LoHa,
            "LOKR" => Method::LoKr,
            _ => return None,
        })
    }

    pub fn peft_type(self) -> &'static str {
        match self {
            Method::Lora => "LORA",
            Method::Ia3 => "IA3",
            Method::LoHa => "LOHA",
            Method::LoKr => "LOKR",
        }
    }

    /// The saved tensor-name suffixes of this method's adapter tensors.
    fn fields(self) -> &'static [(&'static str, Field)] {
        use Field::*;
        match self {
            Method::Lora => &[
                (".lora_A.weight", LoraA),
                (".lora_B.weight", LoraB),
                (".lora_B.bias", LoraBias),
                (".lora_magnitude_vector", Magnitude),
                (".lora_magnitude_vector.weight", Magnitude),
                (".lora_embedding_A", EmbeddingA),
                (".lora_embedding_B", EmbeddingB),
            ],
            Method::Ia3 => &[(".ia3_l", Ia3Vector)],
            Method::LoHa => &[
                (".hada_w1_a", HadaW1A),
                (".hada_w1_b", HadaW1B),
                (".hada_w2_a", HadaW2A),
                (".hada_w2_b", HadaW2B),
            ],
            Method::LoKr => &[
                (".lokr_w1", LokrW1),
                (".lokr_w1_a", LokrW1A),
                (".lokr_w1_b", LokrW1B),
                (".lokr_w2", LokrW2),
                (".lokr_w2_a", LokrW2A),
                (".lokr_w2_b", LokrW2B),
            ],
        }
    }
}

/// Name parts that mark a tensor as adapter weights of some method (anything else that is not
/// a saved base layer is a modules_to_save copy).
const ADAPTER_MARKERS: [&str; 4] = [".lora_", ".ia3_", ".hada_", ".lokr_"];
/// Tensors of LoHa / LoKr's CP-decomposed convolutions (use_effective_conv2d).
const CONV_CP_TENSORS: [&str; 3] = [".hada_t1", ".hada_t2", ".lokr_t2"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    LoraA,
    LoraB,
    LoraBias,
    Magnitude,
    EmbeddingA,
    EmbeddingB,
    Ia3Vector,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
}

/// IA3's `feedforward_modules`: a list of name suffixes, or one regex the whole name must match.
#[derive(Debug)]
enum Feedforward {
    Suffixes(Vec<String>),
    Pattern(Regex),
}

/// The settings of an adapter that its merge depends on, read from `adapter_config.json`.
#[derive(Debug)]
pub struct AdapterSettings {
    pub method: Method,
    /// Rank and alpha (`lora_alpha` for LoRA, `alpha` for LoHa / LoKr); IA3 has neither and
    /// keeps 1 and 1, its vector being the whole adapter.
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
    feedforward: Option<Feedforward>,
}

impl AdapterSettings {
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
        let method = Method::from_peft_type(peft_type).ok_or_else(|| {
            format!(
                "peft_type '{peft_type}' cannot be merged by oxpeft (only LORA, IA3, LOHA and LOKR adapters)"
            )
        })?;
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
        if set("kasa_config") {
            return Err("'kasa_config' is set: KaSA truncates the base weights by an SVD when the adapter \
                        is added, which the offline merge does not do; merge in memory (merge_and_unload(), \
                        then save_pretrained)"
                .into());
        }
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        if method == Method::Ia3 {
            let feedforward = match cfg.get("feedforward_modules") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) => Some(Feedforward::Pattern(
                    Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                        format!("'feedforward_modules' '{p}' is not a supported regex: {e}")
                    })?,
                )),
                Some(Value::Array(a)) => Some(Feedforward::Suffixes(
                    a.iter()
                        .map(|v| {
                            v.as_str().map(str::to_string).ok_or_else(|| {
                                format!("'feedforward_modules' entry {v} is not a string")
                            })
                        })
                        .collect::<std::result::Result<_, _>>()?,
                )),
                Some(v) => {
                    return Err(format!(
                        "'feedforward_modules' must be a list of names or a regex, not {v}"
                    ))
                }
            };
            return Ok(AdapterSettings {
                method,
                r: 1,
                alpha: 1.0,
                use_rslora: false,
                use_dora: false,
                fan_in_fan_out: flag("fan_in_fan_out"),
                rank_pattern: Vec::new(),
                alpha_pattern: Vec::new(),
                feedforward,
            });
        }
        let r = cfg
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or("'r' must be a positive integer")? as usize;
        let alpha_key = if method == Method::Lora {
            "lora_alpha"
        } else {
            "alpha"
        };
        let alpha = cfg
            .get(alpha_key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("'{alpha_key}' must be a number"))?;
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
        // LoHa and LoKr scale by alpha / r only and have no Conv1D (fan_in_fan_out) variant.
        let lora = method == Method::Lora;
        Ok(AdapterSettings {
            method,
            r,
            alpha,
            use_rslora: lora && flag("use_rslora"),
            use_dora: lora && flag("use_dora"),
            fan_in_fan_out: lora && flag("fan_in_fan_out"),
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
            feedforward: None,
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
            .map_or(self.alpha, |p| p.1);
        let scaling = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scaling)
    }

    /// Whether IA3 treats `module` as a feedforward layer (scales its input, not its output);
    /// `None` when the config does not say.
    fn is_feedforward(&self, module: &str) -> Option<bool> {
        Some(match self.feedforward.as_ref()? {
            Feedforward::Suffixes(s) => s.iter().any(|s| module.ends_with(s.as_str())),
            Feedforward::Pattern(re) => re.is_match(module),
        })
    }
}

pub(super) struct Adapter {
    pub(super) file: SafeTensorsFile,
}

/// A LoKr Kronecker factor: stored whole, or as a low-rank product `a @ b`.
#[derive(Clone, Debug)]
pub(super) enum KronFactor {
    Full(String),
    LowRank(String, String),
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
    /// LoHa: `(w1a @ w1b) * (w2a @ w2b)` elementwise, times the scaling, added.
    Hadamard {
        w1a: String,
        w1b: String,
        w2a: String,
        w2b: String,
    },
    /// LoKr: `kron(w1, w2)` times the scaling, added.
    Kron { w1: KronFactor, w2: KronFactor },
    /// IA3: W multiplied (not added) by the vector times the scaling, each row by its element
    /// (`per_row`) or each column by its element. `zero` says some factor is 0, which only
    /// the exact-unmerge sidecar can undo.
    Scale {
        vector: String,
        per_row: bool,
        zero: bool,
    },
}

#[derive(Clone, Debug)]
pub(super) struct Term {
    pub(super) adapter: usize,
    pub(super) kind: TermKind,
    /// The adapter's scaling times its weight (IA3: the weight, which multiplies the vector).
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

type ModuleKeys = BTreeMap<Field, String>;

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
            let settings = AdapterSettings::read(&input.dir.join("adapter_config.json"))?;
            let file = SafeTensorsFile::open(&input.weights_file)?;
            let planner = Planner {
                base,
                file: &file,
                settings: &settings,
                adapter: ai,
                weight: input.weight,
            };

            let mut modules: BTreeMap<String, ModuleKeys> = BTreeMap::new();
            for t in file.tensors() {
                let rest = t.name.strip_prefix(ADAPTER_PREFIX).ok_or_else(|| {
                    planner.err(&t.name, format!("does not start with '{ADAPTER_PREFIX}'"))
                })?;
                let field = settings
                    .method
                    .fields()
                    .iter()
                    .find_map(|(suffix, f)| Some((rest.strip_suffix(suffix)?, *f)));
                if let Some((module, field)) = field {
                    // A layer PEFT nests inside another's base (MultiheadAttention's out_proj) is saved under
                    // `<outer>.base_layer.<inner>`; its weight is `<outer>.<inner>.weight` in the checkpoint.
                    modules
                        .entry(module.replace(".base_layer.", "."))
                        .or_default()
                        .insert(field, t.name.clone());
                } else if let Some(m) = rest.strip_suffix(".base_layer.weight") {
                    if !merged {
                        check_saved_base_layer(base, &file, t, &format!("{m}.weight"))?;
                    }
                } else if CONV_CP_TENSORS.iter().any(|s| rest.ends_with(s)) {
                    return Err(planner.err(
                        &t.name,
                        "belongs to a CP-decomposed convolution adapter (use_effective_conv2d); \
                         only Linear / Conv1D layers can be merged"
                            .into(),
                    ));
                } else if ADAPTER_MARKERS.iter().any(|m| rest.contains(m)) {
                    return Err(planner.err(
                        &t.name,
                        format!(
                            "is not a kind of {} adapter tensor oxpeft can merge",
                            settings.method.peft_type()
                        ),
                    ));
                } else {
                    plan_replace(base, &mut ops, ai, &file, t, rest)?;
                }
            }

            for (module, keys) in &modules {
                match settings.method {
                    Method::Lora => planner.lora(&mut ops, module, keys)?,
                    Method::Ia3 => planner.ia3(&mut ops, module, keys)?,
                    Method::LoHa => planner.loha(&mut ops, module, keys)?,
                    Method::LoKr => planner.lokr(&mut ops, module, keys)?,
                }
            }
            adapters.push(Adapter { file });
        }
        Ok(MergePlan { adapters, ops })
    }
}

/// Plans one adapter's modules against the base checkpoint.
struct Planner<'a> {
    base: &'a Checkpoint,
    file: &'a SafeTensorsFile,
    settings: &'a AdapterSettings,
    adapter: usize,
    weight: f64,
}

impl Planner<'_> {
    fn err(&self, key: &str, reason: String) -> Error {
        Error::invalid_file(self.file.path(), format!("tensor '{key}': {reason}"))
    }

    /// The adapter tensor `key`, which must be a float matrix, or the kernel of a convolution
    /// adapter (up to 5-D), taken as its 2-D [`view2`].
    fn matrix(&self, key: &str) -> Result<&TensorInfo> {
        let t = self.file.require(key)?;
        if FloatType::of(t.dtype).is_none() {
            return Err(self.err(
                key,
                format!("dtype {} is not a float type", t.dtype.as_str()),
            ));
        }
        if !(2..=MAX_DIMS).contains(&t.shape.len()) {
            return Err(self.err(
                key,
                format!(
                    "has shape {:?}; only matrices and convolution kernels (up to {MAX_DIMS}-D) can be merged",
                    t.shape
                ),
            ));
        }
        if t.numel() == 0 {
            return Err(self.err(key, format!("is empty (shape {:?})", t.shape)));
        }
        Ok(t)
    }

    /// The adapter tensor `key`, which must be a float matrix (a factor of a low-rank product).
    fn matrix2(&self, key: &str) -> Result<&TensorInfo> {
        let t = self.matrix(key)?;
        if t.shape.len() != 2 {
            return Err(self.err(
                key,
                format!("has shape {:?}; a 2-D factor was expected", t.shape),
            ));
        }
        Ok(t)
    }

    /// The required field `f` of `module`.
    fn field<'k>(&self, module: &str, keys: &'k ModuleKeys, f: Field) -> Result<&'k String> {
        keys.get(&f).ok_or_else(|| {
            let have: Vec<&str> = keys.values().map(String::as_str).collect();
            let suffix = (self.settings.method.fields().iter())
                .find(|(_, g)| *g == f)
                .map_or("?", |(s, _)| s);
            self.err(
                module,
                format!(
                    "the {} module has {have:?} but no '*{suffix}' tensor",
                    self.settings.method.peft_type()
                ),
            )
        })
    }

    /// The float base weight of `module`, which `adapter_key` changes: a matrix or a convolution
    /// kernel (out, in / groups, *kernel), which the kernels take as its 2-D [`view2`].
    fn base_weight(&self, module: &str, adapter_key: &str) -> Result<(String, &TensorInfo)> {
        let mut weight_key = format!("{module}.weight");
        if self.base.get(&weight_key).is_none()
            && self.base.get(&format!("{module}.in_proj_weight")).is_some()
        {
            // nn.MultiheadAttention: LoRA on the module adapts its packed q/k/v projection.
            weight_key = format!("{module}.in_proj_weight");
        }
        let (_, w) = self.base.get(&weight_key).ok_or_else(|| {
            self.err(
                adapter_key,
                format!(
                    "no base tensor '{weight_key}' in {} to merge into",
                    self.base.dir().display()
                ),
            )
        })?;
        if FloatType::of(w.dtype).is_none() {
            return Err(self.err(
                adapter_key,
                format!(
                    "base tensor '{weight_key}' has dtype {}, not BF16/F16/F32",
                    w.dtype.as_str()
                ),
            ));
        }
        if !(2..=MAX_DIMS).contains(&w.shape.len()) || w.numel() == 0 {
            return Err(self.err(
                adapter_key,
                format!(
                    "base tensor '{weight_key}' has shape {:?}: only matrices and convolution kernels \
                     (up to {MAX_DIMS}-D) can be merged",
                    w.shape
                ),
            ));
        }
        Ok((weight_key, w))
    }

    fn add(
        &self,
        ops: &mut HashMap<String, Op>,
        key: &str,
        kind: TermKind,
        scaling: f64,
    ) -> Result<()> {
        add_term(
            ops,
            key,
            Term {
                adapter: self.adapter,
                kind,
                scaling: scaling as f32,
            },
        )
    }

    /// Checks that a low-rank factor pair has the module's rank.
    fn check_rank(&self, key: &str, got: usize, module: &str) -> Result<()> {
        let (r, _) = self.settings.rank_and_scaling(module);
        if got != r {
            return Err(self.err(
                key,
                format!("has rank {got} but adapter_config.json gives r={r} for module '{module}'"),
            ));
        }
        Ok(())
    }

    fn lora(&self, ops: &mut HashMap<String, Op>, module: &str, keys: &ModuleKeys) -> Result<()> {
        let embedding =
            keys.contains_key(&Field::EmbeddingA) || keys.contains_key(&Field::EmbeddingB);
        let (fa, fb) = if embedding {
            (Field::EmbeddingA, Field::EmbeddingB)
        } else {
            (Field::LoraA, Field::LoraB)
        };
        let (Some(a), Some(b)) = (keys.get(&fa), keys.get(&fb)) else {
            return Err(self.err(module, "module has only one of lora_A / lora_B".into()));
        };
        let (ta, tb) = (self.matrix(a)?, self.matrix(b)?);
        let (_, scaling) = self.settings.rank_and_scaling(module);
        let (weight_key, w) = self.base_weight(module, a)?;
        if w.shape.len() > 2 || ta.shape.len() > 2 || tb.shape.len() > 2 {
            self.check_conv_lora(&weight_key, w, (a, ta), (b, tb))?;
        }
        if ta.shape[0] != view2(&tb.shape)[1] {
            return Err(self.err(
                a,
                format!(
                    "shape {:?} does not pair with {} of shape {:?}",
                    ta.shape, b, tb.shape
                ),
            ));
        }
        self.check_rank(a, ta.shape[0], module)?;
        // The stored layout of W: (out, in) for Linear, (in, out) for Conv1D (fan_in_fan_out)
        // and (num_embeddings, dim) for embeddings, whose delta is (B @ A) transposed.
        let transposed = embedding || self.settings.fan_in_fan_out;
        let (fan_in, fan_out) = (view2(&ta.shape)[1], tb.shape[0]);
        let expect = if transposed {
            [fan_in, fan_out]
        } else {
            [fan_out, fan_in]
        };
        if view2(&w.shape) != expect {
            return Err(self.err(a, format!(
                "with {b} makes a delta of shape {expect:?} but base tensor '{weight_key}' has shape {:?}",
                w.shape
            )));
        }
        let magnitude = keys.get(&Field::Magnitude);
        if magnitude.is_some() != self.settings.use_dora {
            return Err(self.err(
                module,
                format!(
                    "use_dora is {} but the magnitude vector is {}",
                    self.settings.use_dora,
                    if magnitude.is_some() {
                        "present"
                    } else {
                        "missing"
                    }
                ),
            ));
        }
        if let Some(m) = magnitude {
            // Its entries scale W's rows, or its columns when W is stored transposed
            // (fan_in_fan_out, embeddings): fan_out either way.
            let tm = self.file.require(m)?;
            if tm.numel() != fan_out || FloatType::of(tm.dtype).is_none() {
                return Err(self.err(
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
            magnitude: magnitude.cloned(),
        };
        let scaling = scaling * self.weight;
        self.add(ops, &weight_key, kind, scaling)?;
        if let Some(bias) = keys.get(&Field::LoraBias) {
            let bias_key = format!("{module}.bias");
            let tbias = self.file.require(bias)?;
            let (_, wb) = self.base.get(&bias_key).ok_or_else(|| {
                self.err(
                    bias,
                    format!("lora_bias needs a base tensor '{bias_key}', which is missing"),
                )
            })?;
            if tbias.numel() != fan_out
                || wb.numel() != fan_out
                || FloatType::of(tbias.dtype).is_none()
                || FloatType::of(wb.dtype).is_none()
            {
                return Err(self.err(
                    bias,
                    format!(
                        "shape {:?} does not match base '{bias_key}' of shape {:?}",
                        tbias.shape, wb.shape
                    ),
                ));
            }
            let kind = TermKind::Bias { bias: bias.clone() };
            self.add(ops, &bias_key, kind, scaling)?;
        }
        Ok(())
    }

    /// A convolution LoRA: A is a kernel (r, in, *kernel) like W's and B a 1x1 kernel (out, r, 1, ...),
    /// so the delta is B @ A on the 2-D views, reshaped as W. PEFT cannot merge LoRA on grouped
    /// convolutions (its delta is not a grouped kernel), nor can oxpeft.
    fn check_conv_lora(
        &self,
        weight_key: &str,
        w: &TensorInfo,
        (a, ta): (&str, &TensorInfo),
        (b, tb): (&str, &TensorInfo),
    ) -> Result<()> {
        let n = w.shape.len();
        let mismatch = |what: &str| {
            self.err(
                a,
                format!(
                    "of shape {:?} with {b} of shape {:?} is not a LoRA of base tensor '{weight_key}' of \
                     shape {:?}: {what}",
                    ta.shape, tb.shape, w.shape
                ),
            )
        };
        if ta.shape.len() != n || tb.shape.len() != n {
            return Err(mismatch("the kernels' dimensions differ"));
        }
        if ta.shape[1] != w.shape[1] && ta.shape[1] % w.shape[1] == 0 {
            return Err(self.err(
                a,
                format!(
                    "adapts a grouped convolution (groups={}) of base tensor '{weight_key}'; LoRA on \
                     grouped convolutions cannot be merged (PEFT refuses too): keep the adapter unmerged",
                    ta.shape[1] / w.shape[1]
                ),
            ));
        }
        if ta.shape[1..] != w.shape[1..] || tb.shape[2..].iter().any(|&k| k != 1) {
            return Err(mismatch(
                "lora_A must have W's kernel and lora_B must be 1x1",
            ));
        }
        Ok(())
    }

    /// IA3 scales a layer's output (the rows of a Linear weight, and its bias) or, for a
    /// feedforward layer, its input (the columns); a Conv1D weight is stored transposed.
    fn ia3(&self, ops: &mut HashMap<String, Op>, module: &str, keys: &ModuleKeys) -> Result<()> {
        let key = self.field(module, keys, Field::Ia3Vector)?;
        let (weight_key, w) = self.base_weight(module, key)?;
        let tv = self.matrix(key)?;
        if w.shape.len() > 2 {
            return self.ia3_conv(ops, module, key, (&weight_key, w), tv);
        }
        let (in_features, out_features) = if self.settings.fan_in_fan_out {
            (w.shape[0], w.shape[1])
        } else {
            (w.shape[1], w.shape[0])
        };
        let feedforward = self
            .settings
            .is_feedforward(module)
            .unwrap_or(tv.shape[0] == 1 && tv.shape[1] != 1);
        let expect = if feedforward {
            [1, in_features]
        } else {
            [out_features, 1]
        };
        self.check_ia3_shape(key, tv, feedforward, weight_key.as_ref(), w, &expect)?;
        let per_row = feedforward == self.settings.fan_in_fan_out;
        self.add_ia3(
            ops,
            module,
            key,
            &weight_key,
            per_row,
            !feedforward,
            out_features,
        )
    }

    /// IA3 on a convolution: a (1, channels, 1, ...) vector that scales W's output channels (the
    /// rows of its 2-D view) or, for a feedforward layer, its input channels (each a run of
    /// `kernel size` columns of the view).
    fn ia3_conv(
        &self,
        ops: &mut HashMap<String, Op>,
        module: &str,
        key: &str,
        (weight_key, w): (&str, &TensorInfo),
        tv: &TensorInfo,
    ) -> Result<()> {
        let n = tv.numel();
        let feedforward =
            (self.settings.is_feedforward(module)).unwrap_or(n == w.shape[1] && n != w.shape[0]);
        let channels = w.shape[if feedforward { 1 } else { 0 }];
        let mut expect = vec![1; w.shape.len()];
        expect[1] = channels;
        self.check_ia3_shape(key, tv, feedforward, weight_key.as_ref(), w, &expect)?;
        self.add_ia3(
            ops,
            module,
            key,
            weight_key,
            !feedforward,
            !feedforward,
            w.shape[0],
        )
    }

    /// Checks that IA3 vector `tv` has the shape `expect` its base tensor needs.
    fn check_ia3_shape(
        &self,
        key: &str,
        tv: &TensorInfo,
        feedforward: bool,
        weight_key: &str,
        w: &TensorInfo,
        expect: &[usize],
    ) -> Result<()> {
        if tv.shape[..] == expect[..] {
            return Ok(());
        }
        Err(self.err(
            key,
            format!(
                "has shape {:?}, but a {} IA3 vector for base tensor '{weight_key}' of shape {:?} has shape \
                 {expect:?}",
                tv.shape,
                if feedforward { "feedforward" } else { "non-feedforward" },
                w.shape
            ),
        ))
    }

    /// Adds an IA3 vector's term to the weight, and to the bias when it scales the output.
    #[allow(clippy::too_many_arguments)]
    fn add_ia3(
        &self,
        ops: &mut HashMap<String, Op>,
        module: &str,
        key: &str,
        weight_key: &str,
        per_row: bool,
        scales_output: bool,
        out_features: usize,
    ) -> Result<()> {
        // PEFT's add_weighted_adapter weighs IA3 vectors themselves.
        let weight = self.weight as f32;
        let zero = self
            .file
            .read_f32(self.file.require(key)?)?
            .iter()
            .any(|&v| v * weight == 0.0);
        let kind = |per_row| TermKind::Scale {
            vector: key.to_string(),
            per_row,
            zero,
        };
        self.add(ops, weight_key, kind(per_row), self.weight)?;
        let bias_key = format!("{module}.bias");
        if let (true, Some((_, b))) = (scales_output, self.base.get(&bias_key)) {
            if b.numel() != out_features || FloatType::of(b.dtype).is_none() {
                return Err(self.err(
                    key,
                    format!(
                        "base tensor '{bias_key}' of shape {:?} {} is not a float bias of {out_features} elements",
                        b.shape,
                        b.dtype.as_str()
                    ),
                ));
            }
            self.add(ops, &bias_key, kind(false), self.weight)?;
        }
        Ok(())
    }

    fn loha(&self, ops: &mut HashMap<String, Op>, module: &str, keys: &ModuleKeys) -> Result<()> {
        let [w1a, w1b, w2a, w2b] = [
            Field::HadaW1A,
            Field::HadaW1B,
            Field::HadaW2A,
            Field::HadaW2B,
        ]
        .map(|f| self.field(module, keys, f));
        let (w1a, w1b, w2a, w2b) = (w1a?, w1b?, w2a?, w2b?);
        let (weight_key, w) = self.base_weight(module, w1a)?;
        for (a, b) in [(w1a, w1b), (w2a, w2b)] {
            let (ta, tb) = (self.matrix2(a)?, self.matrix2(b)?);
            if ta.shape[1] != tb.shape[0] || [ta.shape[0], tb.shape[1]] != view2(&w.shape) {
                return Err(self.err(
                    a,
                    format!(
                        "of shape {:?} with {b} of shape {:?} does not make a delta of base tensor \
                         '{weight_key}' of shape {:?}",
                        ta.shape, tb.shape, w.shape
                    ),
                ));
            }
            self.check_rank(a, ta.shape[1], module)?;
        }
        let (_, scaling) = self.settings.rank_and_scaling(module);
        let kind = TermKind::Hadamard {
            w1a: w1a.clone(),
            w1b: w1b.clone(),
            w2a: w2a.clone(),
            w2b: w2b.clone(),
        };
        self.add(ops, &weight_key, kind, scaling * self.weight)
    }

    /// One Kronecker factor of `module`, stored whole or as a low-rank pair, and its shape.
    fn kron_factor(
        &self,
        module: &str,
        keys: &ModuleKeys,
        [full, fa, fb]: [Field; 3],
    ) -> Result<(KronFactor, [usize; 2], String)> {
        if let Some(k) = keys.get(&full) {
            if keys.contains_key(&fa) || keys.contains_key(&fb) {
                return Err(self.err(k, "is stored both whole and as a low-rank pair".into()));
            }
            let t = self.matrix(k)?;
            if t.shape.len() == 3 {
                // PEFT's torch.kron of a matrix and a 3-D kernel pairs w1 with the kernel's last two
                // dimensions, a layout oxpeft does not reproduce.
                return Err(self.err(
                    k,
                    "is a full Conv1d Kronecker factor; oxpeft cannot merge it offline (merge it in \
                     memory with merge_and_unload)"
                        .into(),
                ));
            }
            return Ok((KronFactor::Full(k.clone()), view2(&t.shape), k.clone()));
        }
        let (a, b) = (self.field(module, keys, fa)?, self.field(module, keys, fb)?);
        let (ta, tb) = (self.matrix2(a)?, self.matrix2(b)?);
        if ta.shape[1] != tb.shape[0] {
            return Err(self.err(
                a,
                format!(
                    "shape {:?} does not pair with {b} of shape {:?}",
                    ta.shape, tb.shape
                ),
            ));
        }
        self.check_rank(a, ta.shape[1], module)?;
        Ok((
            KronFactor::LowRank(a.clone(), b.clone()),
            [ta.shape[0], tb.shape[1]],
            a.clone(),
        ))
    }

    fn lokr(&self, ops: &mut HashMap<String, Op>, module: &str, keys: &ModuleKeys) -> Result<()> {
        let any_key = keys.values().next().expect("a module has a tensor");
        let (weight_key, w) = self.base_weight(module, any_key)?;
        let (w1, s1, k1) = self.kron_factor(
            module,
            keys,
            [Field::LokrW1, Field::LokrW1A, Field::LokrW1B],
        )?;
        let (w2, s2, k2) = self.kron_factor(
            module,
            keys,
            [Field::LokrW2, Field::LokrW2A, Field::LokrW2B],
        )?;
        let expect = [s1[0] * s2[0], s1[1] * s2[1]];
        if view2(&w.shape) != expect {
            return Err(self.err(
                &k1,
                format!(
                    "({s1:?}) kron {k2} ({s2:?}) makes a delta of shape {expect:?} but base tensor \
                     '{weight_key}' has shape {:?}",
                    w.shape
                ),
            ));
        }
        let (_, scaling) = self.settings.rank_and_scaling(module);
        self.add(
            ops,
            &weight_key,
            TermKind::Kron { w1, w2 },
            scaling * self.weight,
        )
    }
}

/// The most dimensions of a tensor the merge changes: a Conv3d kernel (out, in, d, h, w).
const MAX_DIMS: usize = 5;

/// A matrix, or a convolution kernel (out, in, *kernel) seen as the (out, in * kernel size)
/// matrix its row-major bytes are: how every adapter factor and delta of a kernel is laid out.
pub(super) fn view2(shape: &[usize]) -> [usize; 2] {
    match shape {
        [] => [1, 1],
        [n] => [1, *n],
        [rows, rest @ ..] => [*rows, rest.iter().product()],
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
            "is both replaced (modules_to_save) and changed by an adapter",
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
