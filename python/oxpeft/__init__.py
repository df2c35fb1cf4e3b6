"""oxpeft: parameter-efficient fine-tuning with HF PEFT's API and files and a Rust core.

The public names are imported on first use, so `import oxpeft` is cheap: the offline merge, the config
tools and the CLI never load torch or transformers unless they need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oxpeft._lazy import lazy_exports
from oxpeft._native import version as _native_version

__version__: str = _native_version()

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "AutoPeftModel": "oxpeft.auto",
    "AutoPeftModelForCausalLM": "oxpeft.auto",
    "AutoPeftModelForFeatureExtraction": "oxpeft.auto",
    "AutoPeftModelForQuestionAnswering": "oxpeft.auto",
    "AutoPeftModelForSeq2SeqLM": "oxpeft.auto",
    "AutoPeftModelForSequenceClassification": "oxpeft.auto",
    "AutoPeftModelForTokenClassification": "oxpeft.auto",
    "MergeReport": "oxpeft.checkpoint",
    "merge_checkpoint": "oxpeft.checkpoint",
    "unmerge_checkpoint": "oxpeft.checkpoint",
    "PeftConfig": "oxpeft.config",
    "PromptLearningConfig": "oxpeft.config",
    "PeftType": "oxpeft.utils.peft_types",
    "TaskType": "oxpeft.utils.peft_types",
    "PeftWarning": "oxpeft.utils.warning",
    "cast_mixed_precision_params": "oxpeft.utils.other",
    "NoMatchingPeftModuleError": "oxpeft.utils.error",
    "PeftError": "oxpeft.utils.error",
    "LoftQConfig": "oxpeft.loftq",
    "replace_lora_weights_loftq": "oxpeft.loftq",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "oxpeft.mapping",
    "PEFT_TYPE_TO_TUNER_MAPPING": "oxpeft.mapping",
    "PEFT_TYPE_TO_PREFIX_MAPPING": "oxpeft.mapping",
    "get_peft_config": "oxpeft.mapping",
    "inject_adapter_in_model": "oxpeft.mapping",
    "get_peft_model": "oxpeft.mapping_func",
    "Linear4bit": "oxpeft.quant",
    "Linear8bit": "oxpeft.quant",
    "QuantizationConfig": "oxpeft.quant",
    "load_quantized": "oxpeft.quant",
    "prepare_model_for_kbit_training": "oxpeft.quant",
    "quantize_model": "oxpeft.quant",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": "oxpeft.peft_model",
    "PeftMixedModel": "oxpeft.mixed_model",
    "PeftModel": "oxpeft.peft_model",
    "PeftModelForCausalLM": "oxpeft.peft_model",
    "PeftModelForFeatureExtraction": "oxpeft.peft_model",
    "PeftModelForQuestionAnswering": "oxpeft.peft_model",
    "PeftModelForSeq2SeqLM": "oxpeft.peft_model",
    "PeftModelForSequenceClassification": "oxpeft.peft_model",
    "PeftModelForTokenClassification": "oxpeft.peft_model",
    "get_layer_status": "oxpeft.peft_model",
    "get_model_status": "oxpeft.peft_model",
    "get_base_model_state_dict": "oxpeft.utils.save_and_load",
    "get_peft_model_state_dict": "oxpeft.utils.save_and_load",
    "set_base_model_state_dict": "oxpeft.utils.save_and_load",
    "load_peft_weights": "oxpeft.utils.save_and_load",
    "set_peft_model_state_dict": "oxpeft.utils.save_and_load",
    "AdaLoraConfig": "oxpeft.tuners.adalora",
    "AdaLoraModel": "oxpeft.tuners.adalora",
    "IA3Config": "oxpeft.tuners.ia3",
    "BdLoraConfig": "oxpeft.tuners.lora",
    "KasaConfig": "oxpeft.tuners.lora",
    "MontecloraConfig": "oxpeft.tuners.lora",
    "VeloraConfig": "oxpeft.tuners.lora",
    "TrainableTokensConfig": "oxpeft.tuners.trainable_tokens",
    "TrainableTokensModel": "oxpeft.tuners.trainable_tokens",
    "IA3Model": "oxpeft.tuners.ia3",
    "LoHaConfig": "oxpeft.tuners.loha",
    "LoHaModel": "oxpeft.tuners.loha",
    "LoKrConfig": "oxpeft.tuners.lokr",
    "LoKrModel": "oxpeft.tuners.lokr",
    "LoraConfig": "oxpeft.tuners.lora",
    "LoraRuntimeConfig": "oxpeft.tuners.lora",
    "LoraModel": "oxpeft.tuners.lora",
    "PrefixEncoder": "oxpeft.tuners.prefix_tuning",
    "PrefixTuningConfig": "oxpeft.tuners.prefix_tuning",
    "PromptEncoder": "oxpeft.tuners.p_tuning",
    "PromptEncoderConfig": "oxpeft.tuners.p_tuning",
    "PromptEncoderReparameterizationType": "oxpeft.tuners.p_tuning",
    "PromptEmbedding": "oxpeft.tuners.prompt_tuning",
    "PromptTuningConfig": "oxpeft.tuners.prompt_tuning",
    "PromptTuningInit": "oxpeft.tuners.prompt_tuning",
    "PeftTrainer": "oxpeft.trainer",
}

__all__ = ["__version__", *_EXPORTS]


lazy_exports(globals(), _EXPORTS)


if TYPE_CHECKING:
    from oxpeft.auto import (
        AutoPeftModel,
        AutoPeftModelForCausalLM,
        AutoPeftModelForFeatureExtraction,
        AutoPeftModelForQuestionAnswering,
        AutoPeftModelForSeq2SeqLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForTokenClassification,
    )
    from oxpeft.checkpoint import MergeReport, merge_checkpoint, unmerge_checkpoint
    from oxpeft.config import PeftConfig, PromptLearningConfig
    from oxpeft.loftq import LoftQConfig, replace_lora_weights_loftq
    from oxpeft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        get_peft_config,
        inject_adapter_in_model,
    )
    from oxpeft.mapping_func import get_peft_model
    from oxpeft.mixed_model import PeftMixedModel
    from oxpeft.peft_model import (
        MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
        PeftModel,
        PeftModelForCausalLM,
        PeftModelForFeatureExtraction,
        PeftModelForQuestionAnswering,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
        get_layer_status,
        get_model_status,
    )
    from oxpeft.quant import (
        Linear4bit,
        Linear8bit,
        QuantizationConfig,
        load_quantized,
        prepare_model_for_kbit_training,
        quantize_model,
    )
    from oxpeft.trainer import PeftTrainer
    from oxpeft.tuners.adalora import AdaLoraConfig, AdaLoraModel
    from oxpeft.tuners.ia3 import IA3Config, IA3Model
    from oxpeft.tuners.trainable_tokens import TrainableTokensConfig, TrainableTokensModel
    from oxpeft.tuners.loha import LoHaConfig, LoHaModel
    from oxpeft.tuners.lokr import LoKrConfig, LoKrModel
    from oxpeft.tuners.lora import LoraConfig, LoraModel, LoraRuntimeConfig
    from oxpeft.tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
    from oxpeft.tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
    from oxpeft.tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
    from oxpeft.utils.other import cast_mixed_precision_params
    from oxpeft.utils.peft_types import PeftType, TaskType
    from oxpeft.utils.save_and_load import (
        get_base_model_state_dict,
        get_peft_model_state_dict,
        load_peft_weights,
        set_base_model_state_dict,
        set_peft_model_state_dict,
    )
    from oxpeft.utils.error import NoMatchingPeftModuleError, PeftError
    from oxpeft.utils.warning import PeftWarning
