"""The adapter methods, one package each (`config.py`, `layer.py` / `model.py`), with HF PEFT's names.

Importing this package imports every method, which registers each in `oxpeft.mapping`'s registries.
"""

from oxpeft.tuners.adalora import AdaLoraConfig, AdaLoraModel
from oxpeft.tuners.ia3 import IA3Config, IA3Model
from oxpeft.tuners.loha import LoHaConfig, LoHaModel
from oxpeft.tuners.lokr import LoKrConfig, LoKrModel
from oxpeft.tuners.lora import BdLoraConfig, KasaConfig, LoraConfig, LoraModel, MontecloraConfig, VeloraConfig
from oxpeft.tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from oxpeft.tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from oxpeft.tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from oxpeft.tuners.trainable_tokens import TrainableTokensConfig, TrainableTokensModel

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "BdLoraConfig",
    "KasaConfig",
    "MontecloraConfig",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoraConfig",
    "LoraModel",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "VeloraConfig",
]
