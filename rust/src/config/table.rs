//! The fields of every adapter config class oxpeft reads and writes, with the PEFT release that added
//! each one and its default. Read from the sources of every PEFT release from 0.2.0 to 0.21.2
//! (the dataclass fields of `PeftConfig`, `PromptLearningConfig`, `LoraConfig`, `AdaLoraConfig`,
//! `IA3Config`, `LycorisConfig`, `LoHaConfig`, `LoKrConfig` and the prompt-learning configs).

use super::version::Version;

const fn v(minor: u16) -> Version {
    Version(0, minor, 0)
}

/// What a field's value may be. `null` is allowed exactly when the default is `null`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Bool,
    /// A non-negative integer.
    Count,
    /// Any integer (LoKr's `decompose_factor` uses -1 for "no factor").
    Int,
    Number,
    Str,
    /// One of the listed strings.
    OneOf(&'static [&'static str]),
    /// A module selector: a regex string or a list of names.
    Modules,
    /// A list of strings.
    Names,
    /// A JSON object.
    Object,
    /// Anything: nested configs whose inner schema belongs to the method's own code.
    Any,
}

/// Whether a field changes what an adapter computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Describes the file (base model, version, hub mapping); never changes results.
    Meta,
    /// Changes what the adapter computes or how it is built when it is not neutral.
    Feature,
    /// Matters only while the named field is not neutral (e.g. `qalora_group_size` needs `use_qalora`).
    With(&'static str),
}

#[derive(Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    pub since: Version,
    /// The default as JSON text (the value the dataclass writes when the user sets nothing).
    pub default: &'static str,
    pub kind: Kind,
    pub role: Role,
}

const fn f(name: &'static str, since: Version, default: &'static str, kind: Kind) -> Field {
    Field {
        name,
        since,
        default,
        kind,
        role: Role::Feature,
    }
}

const fn meta(name: &'static str, since: Version, default: &'static str, kind: Kind) -> Field {
    Field {
        name,
        since,
        default,
        kind,
        role: Role::Meta,
    }
}

const fn with(
    name: &'static str,
    since: Version,
    default: &'static str,
    kind: Kind,
    needs: &'static str,
) -> Field {
    Field {
        name,
        since,
        default,
        kind,
        role: Role::With(needs),
    }
}

pub(crate) const TASK_TYPES: &[&str] = &[
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
];

/// `PeftConfigMixin` / `PeftConfig`: on every config. `peft_type` is handled apart (it selects the class).
static BASE: &[Field] = &[
    f("task_type", v(2), "null", Kind::OneOf(TASK_TYPES)),
    meta("base_model_name_or_path", v(2), "null", Kind::Str),
    meta("inference_mode", v(2), "false", Kind::Bool),
    meta("revision", v(4), "null", Kind::Str),
    meta("auto_mapping", v(4), "null", Kind::Object),
    meta("peft_version", v(18), "null", Kind::Str),
];

static LORA: &[Field] = &[
    f("r", v(2), "8", Kind::Count),
    f("target_modules", v(2), "null", Kind::Modules),
    // The default was None until 0.4; every config that PEFT wrote carries an explicit value.
    f("lora_alpha", v(2), "8", Kind::Number),
    f("lora_dropout", v(2), "0.0", Kind::Number),
    f("fan_in_fan_out", v(2), "false", Kind::Bool),
    f(
        "bias",
        v(2),
        "\"none\"",
        Kind::OneOf(&["none", "all", "lora_only"]),
    ),
    f("modules_to_save", v(2), "null", Kind::Names),
    f("init_lora_weights", v(3), "true", Kind::Any),
    f("layers_to_transform", v(4), "null", Kind::Any),
    f("layers_pattern", v(4), "null", Kind::Modules),
    f("rank_pattern", v(6), "{}", Kind::Object),
    f("alpha_pattern", v(6), "{}", Kind::Object),
    f("megatron_config", v(7), "null", Kind::Object),
    with(
        "megatron_core",
        v(7),
        "\"megatron.core\"",
        Kind::Str,
        "megatron_config",
    ),
    f("loftq_config", v(7), "{}", Kind::Object),
    f("use_rslora", v(8), "false", Kind::Bool),
    f("use_dora", v(9), "false", Kind::Bool),
    f("layer_replication", v(10), "null", Kind::Any),
    f("exclude_modules", v(14), "null", Kind::Modules),
    f("eva_config", v(14), "null", Kind::Object),
    f("lora_bias", v(14), "false", Kind::Bool),
    f("trainable_token_indices", v(15), "null", Kind::Any),
    f("corda_config", v(15), "null", Kind::Object),
    f("use_qalora", v(16), "false", Kind::Bool),
    with("qalora_group_size", v(16), "16", Kind::Count, "use_qalora"),
    f("target_parameters", v(17), "null", Kind::Names),
    f("alora_invocation_tokens", v(18), "null", Kind::Any),
    f("arrow_config", v(18), "null", Kind::Object),
    f("ensure_weight_tying", v(18), "false", Kind::Bool),
    f("lora_ga_config", v(19), "null", Kind::Object),
    f("use_bdlora", v(19), "null", Kind::Object),
    f("velora_config", v(20), "null", Kind::Object),
    f("monteclora_config", v(20), "null", Kind::Object),
    f("kasa_config", v(21), "null", Kind::Object),
];

/// `AdaLoraConfig` extends `LoraConfig`; these come after (and override) the LoRA fields.
static ADALORA: &[Field] = &[
    f("target_r", v(3), "8", Kind::Count),
    f("init_r", v(3), "12", Kind::Count),
    f("tinit", v(3), "0", Kind::Count),
    f("tfinal", v(3), "0", Kind::Count),
    f("deltaT", v(3), "1", Kind::Count),
    f("beta1", v(3), "0.85", Kind::Number),
    f("beta2", v(3), "0.85", Kind::Number),
    f("orth_reg_weight", v(3), "0.5", Kind::Number),
    f("total_step", v(3), "null", Kind::Count),
    f("rank_pattern", v(3), "null", Kind::Object),
];

static IA3: &[Field] = &[
    f("target_modules", v(4), "null", Kind::Modules),
    f("feedforward_modules", v(4), "null", Kind::Modules),
    f("fan_in_fan_out", v(4), "false", Kind::Bool),
    f("modules_to_save", v(4), "null", Kind::Names),
    f("init_ia3_weights", v(4), "true", Kind::Bool),
    f("exclude_modules", v(14), "null", Kind::Modules),
];

/// `LycorisConfig`, shared by LoHa and LoKr.
static LYCORIS: &[Field] = &[
    f("r", v(6), "8", Kind::Count),
    f("alpha", v(6), "8", Kind::Number),
    f("rank_dropout", v(6), "0.0", Kind::Number),
    f("module_dropout", v(6), "0.0", Kind::Number),
    f("use_effective_conv2d", v(6), "false", Kind::Bool),
    f("target_modules", v(6), "null", Kind::Modules),
    f("init_weights", v(6), "true", Kind::Any),
    f("layers_to_transform", v(6), "null", Kind::Any),
    f("layers_pattern", v(6), "null", Kind::Modules),
    f("modules_to_save", v(6), "null", Kind::Names),
    f("rank_pattern", v(6), "{}", Kind::Object),
    f("alpha_pattern", v(6), "{}", Kind::Object),
    f("exclude_modules", v(14), "null", Kind::Modules),
];

static LOKR: &[Field] = &[
    f("decompose_both", v(6), "false", Kind::Bool),
    f("decompose_factor", v(6), "-1", Kind::Int),
    f("rank_dropout_scale", v(14), "false", Kind::Bool),
];

/// `PromptLearningConfig`, shared by prompt tuning, p-tuning and prefix tuning.
static PROMPT_LEARNING: &[Field] = &[
    f("num_virtual_tokens", v(2), "null", Kind::Count),
    f("token_dim", v(2), "null", Kind::Count),
    f("num_transformer_submodules", v(2), "null", Kind::Count),
    f("num_attention_heads", v(2), "null", Kind::Count),
    f("num_layers", v(2), "null", Kind::Count),
    f("modules_to_save", v(17), "null", Kind::Names),
];

static PROMPT_TUNING: &[Field] = &[
    f(
        "prompt_tuning_init",
        v(2),
        "\"RANDOM\"",
        Kind::OneOf(&["TEXT", "SAMPLE_VOCAB", "RANDOM"]),
    ),
    f("prompt_tuning_init_text", v(2), "null", Kind::Str),
    f("tokenizer_name_or_path", v(2), "null", Kind::Str),
    f("tokenizer_kwargs", v(7), "null", Kind::Object),
];

static P_TUNING: &[Field] = &[
    f(
        "encoder_reparameterization_type",
        v(2),
        "\"MLP\"",
        Kind::OneOf(&["MLP", "LSTM"]),
    ),
    f("encoder_hidden_size", v(2), "null", Kind::Count),
    f("encoder_num_layers", v(2), "2", Kind::Count),
    f("encoder_dropout", v(2), "0.0", Kind::Number),
];

static PREFIX_TUNING: &[Field] = &[
    f("encoder_hidden_size", v(2), "null", Kind::Count),
    f("prefix_projection", v(2), "false", Kind::Bool),
    f("init_weights", v(19), "null", Kind::OneOf(&["zero"])),
];

static TRAINABLE_TOKENS: &[Field] = &[
    f("token_indices", v(15), "[]", Kind::Any),
    f("target_modules", v(15), "null", Kind::Modules),
    f("init_weights", v(15), "true", Kind::Bool),
];

/// A string value of a field that only some releases understand.
#[derive(Debug)]
pub(crate) struct ValueFeature {
    pub field: &'static str,
    /// The value, or with `prefix` any value starting with it (`pissa_niter_16`).
    pub value: &'static str,
    pub prefix: bool,
    pub since: Version,
}

const fn val(field: &'static str, value: &'static str, since: Version) -> ValueFeature {
    ValueFeature {
        field,
        value,
        prefix: false,
        since,
    }
}

static LORA_VALUES: &[ValueFeature] = &[
    val("init_lora_weights", "gaussian", v(7)),
    val("init_lora_weights", "loftq", v(7)),
    val("init_lora_weights", "pissa", v(11)),
    ValueFeature {
        field: "init_lora_weights",
        value: "pissa_niter_",
        prefix: true,
        since: v(11),
    },
    val("init_lora_weights", "olora", v(12)),
    val("init_lora_weights", "eva", v(14)),
    val("init_lora_weights", "corda", v(15)),
    val("init_lora_weights", "orthogonal", v(16)),
    val("init_lora_weights", "lora_ga", v(19)),
    val("init_lora_weights", "mica", v(20)),
];

/// Values of base fields that some releases lack, shared by every method.
pub(crate) static BASE_VALUES: &[ValueFeature] = &[
    val("task_type", "QUESTION_ANS", v(4)),
    val("task_type", "FEATURE_EXTRACTION", v(4)),
];

static LOKR_VALUES: &[ValueFeature] = &[val("init_weights", "lycoris", v(14))];
static PROMPT_TUNING_VALUES: &[ValueFeature] = &[val("prompt_tuning_init", "SAMPLE_VOCAB", v(18))];

/// One adapter method: its `peft_type`, the release that added it and its fields.
#[derive(Debug)]
pub(crate) struct Method {
    pub peft_type: &'static str,
    pub since: Version,
    /// Field groups in inheritance order; a later group's field overrides an earlier one of the same name.
    pub groups: &'static [&'static [Field]],
    /// Fields that decide what the adapter computes and have no default that could stand in for them.
    pub required: &'static [&'static str],
    pub values: &'static [ValueFeature],
    /// Selector fields that take a list from 0.6 on (a plain string before).
    pub list_selectors_since: Option<(&'static str, Version)>,
}

pub(crate) static METHODS: &[Method] = &[
    Method {
        peft_type: "LORA",
        since: v(2),
        groups: &[BASE, LORA],
        required: &["r", "lora_alpha"],
        values: LORA_VALUES,
        list_selectors_since: Some(("layers_pattern", v(6))),
    },
    Method {
        peft_type: "ADALORA",
        since: v(3),
        groups: &[BASE, LORA, ADALORA],
        required: &["lora_alpha", "init_r", "target_r"],
        values: LORA_VALUES,
        list_selectors_since: Some(("layers_pattern", v(6))),
    },
    Method {
        peft_type: "IA3",
        since: v(4),
        groups: &[BASE, IA3],
        required: &[],
        values: &[],
        list_selectors_since: None,
    },
    Method {
        peft_type: "LOHA",
        since: v(6),
        groups: &[BASE, LYCORIS],
        required: &["r", "alpha"],
        values: &[],
        list_selectors_since: None,
    },
    Method {
        peft_type: "LOKR",
        since: v(6),
        groups: &[BASE, LYCORIS, LOKR],
        required: &["r", "alpha"],
        values: LOKR_VALUES,
        list_selectors_since: None,
    },
    Method {
        peft_type: "PROMPT_TUNING",
        since: v(2),
        groups: &[BASE, PROMPT_LEARNING, PROMPT_TUNING],
        required: &["num_virtual_tokens"],
        values: PROMPT_TUNING_VALUES,
        list_selectors_since: None,
    },
    Method {
        peft_type: "P_TUNING",
        since: v(2),
        groups: &[BASE, PROMPT_LEARNING, P_TUNING],
        required: &["num_virtual_tokens"],
        values: &[],
        list_selectors_since: None,
    },
    Method {
        peft_type: "PREFIX_TUNING",
        since: v(2),
        groups: &[BASE, PROMPT_LEARNING, PREFIX_TUNING],
        required: &["num_virtual_tokens"],
        values: &[],
        list_selectors_since: None,
    },
    Method {
        peft_type: "TRAINABLE_TOKENS",
        since: v(15),
        groups: &[BASE, TRAINABLE_TOKENS],
        required: &["token_indices"],
        values: &[],
        list_selectors_since: None,
    },
];

/// Every PEFT release from the first one oxpeft writes for (0.3.0) to the newest one it knows.
pub(crate) static RELEASES: &[Version] = &[
    Version(0, 3, 0),
    Version(0, 4, 0),
    Version(0, 5, 0),
    Version(0, 6, 0),
    Version(0, 6, 1),
    Version(0, 6, 2),
    Version(0, 7, 0),
    Version(0, 7, 1),
    Version(0, 8, 0),
    Version(0, 8, 1),
    Version(0, 8, 2),
    Version(0, 9, 0),
    Version(0, 10, 0),
    Version(0, 11, 0),
    Version(0, 11, 1),
    Version(0, 12, 0),
    Version(0, 13, 0),
    Version(0, 13, 1),
    Version(0, 13, 2),
    Version(0, 14, 0),
    Version(0, 15, 0),
    Version(0, 15, 1),
    Version(0, 15, 2),
    Version(0, 16, 0),
    Version(0, 17, 0),
    Version(0, 17, 1),
    Version(0, 18, 0),
    Version(0, 18, 1),
    Version(0, 19, 0),
    Version(0, 19, 1),
    Version(0, 20, 0),
    Version(0, 21, 0),
    Version(0, 21, 1),
    Version(0, 21, 2),
];

/// How a release treats a key its config class does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnknownKeys {
    /// Up to 0.5: `from_pretrained` copies only attributes the class has; others vanish silently.
    Ignored,
    /// 0.6 to 0.13: `TypeError: __init__() got an unexpected keyword argument`.
    Rejected,
    /// 0.14 on: dropped with a warning.
    DroppedWithWarning,
}

pub(crate) fn unknown_keys(release: Version) -> UnknownKeys {
    if release < v(6) {
        UnknownKeys::Ignored
    } else if release < v(14) {
        UnknownKeys::Rejected
    } else {
        UnknownKeys::DroppedWithWarning
    }
}

/// Keys of the PEFT 0.1/0.2 LoRA layout, dropped in 0.3.
pub(crate) const LEGACY_ENABLE_LORA: &str = "enable_lora";
pub(crate) const LEGACY_MERGE_WEIGHTS: &str = "merge_weights";
/// A LoRA runtime setting (0.12 on) that PEFT never saves; a config carrying it was written by hand.
pub(crate) const RUNTIME_CONFIG: &str = "runtime_config";
