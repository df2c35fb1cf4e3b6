"""oxpeft: parameter-efficient fine-tuning with HF PEFT's API and files and a Rust core."""

from oxpeft._native import version as _native_version
from oxpeft.checkpoint import MergeReport, merge_checkpoint, unmerge_checkpoint
from oxpeft.config import PeftConfig, PeftType, TaskType
from oxpeft.loftq import LoftQConfig, replace_lora_weights_loftq
from oxpeft.mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_model,
)
from oxpeft.quant import (
    Linear4bit,
    Linear8bit,
    QuantizationConfig,
    load_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
)
from oxpeft.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from oxpeft.save_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from oxpeft.tuners.adalora import AdaLoraConfig, AdaLoraModel
from oxpeft.tuners.ia3 import IA3Config, IA3Model
from oxpeft.tuners.loha import LoHaConfig, LoHaModel
from oxpeft.tuners.lokr import LoKrConfig, LoKrModel
from oxpeft.tuners.lora.config import LoraConfig
from oxpeft.tuners.lora.model import LoraModel
from oxpeft.tuners.prompt import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

__version__: str = _native_version()


def __getattr__(name: str):
    # PeftTrainer pulls in transformers' Trainer (and accelerate); import it only when asked for.
    if name == "PeftTrainer":
        from oxpeft.trainer import PeftTrainer

        return PeftTrainer
    raise AttributeError(f"module 'oxpeft' has no attribute {name!r}")

__all__ = [
    "__version__",
    "PeftConfig",
    "PeftType",
    "TaskType",
    "LoraConfig",
    "LoftQConfig",
    "replace_lora_weights_loftq",
    "LoraModel",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "AdaLoraConfig",
    "AdaLoraModel",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PrefixTuningConfig",
    "PeftModel",
    "PeftTrainer",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "get_peft_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "Linear4bit",
    "Linear8bit",
    "QuantizationConfig",
    "load_quantized",
    "prepare_model_for_kbit_training",
    "quantize_model",
]
__all__ += ["MergeReport", "merge_checkpoint", "unmerge_checkpoint"]
