"""`LoraConfig`: HF PEFT's field names and defaults, so adapter_config.json files move both ways."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from oxpeft.config import PeftConfig, subconfig
from oxpeft.tuners.lora.bdlora import BdLoraConfig
from oxpeft.tuners.lora.kasa import KasaConfig
from oxpeft.tuners.lora.monteclora import MontecloraConfig
from oxpeft.tuners.lora.velora import VeloraConfig
from oxpeft.utils.peft_types import PeftType

InitLoraWeights = Union[bool, Literal["gaussian", "pissa", "olora", "orthogonal", "loftq", "mica"], str]

# Fields PEFT defines for methods oxpeft does not implement. They are kept so that any PEFT config loads;
# a non-neutral value is refused with a clear error instead of being silently ignored.
_UNSUPPORTED_FEATURES = (
    "megatron_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "alora_invocation_tokens",
    "layer_replication",
    "arrow_config",
)


@dataclass
class LoraRuntimeConfig:
    """Settings that hold while the model runs and are never saved (PEFT's `LoraRuntimeConfig`).

    `ephemeral_gpu_offload`: compute DoRA's initial magnitude on the GPU for base weights kept in CPU memory, and
    move the result back (the same values, faster); without a CUDA device it is computed where the weight is.
    """

    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (see HF PEFT's `LoraConfig` for the meaning of each field).

    `target_modules` is a list of module names (a name matches a module whose full name equals it or ends with
    ``"." + name``), a regex that must match the whole module name, ``"all-linear"``, or None for the default of
    the model's architecture. Unlike PEFT, every list entry that matches no module is an error.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: InitLoraWeights = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: VeloraConfig | dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: MontecloraConfig | dict | None = None
    layer_replication: list[tuple[int, int]] | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: BdLoraConfig | dict | None = None
    arrow_config: dict | None = None
    kasa_config: KasaConfig | dict | None = None
    ensure_weight_tying: bool = False
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig, metadata={"runtime_only": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError("modules_to_save must be a list of module names, not a string")
            self.modules_to_save = list(self.modules_to_save)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules")
        for name, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {r!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("use_dora and lora_bias cannot be combined")
        if dataclasses.is_dataclass(self.loftq_config):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        self._check_init(self.init_lora_weights)
        self._refuse_unsupported()
        self.use_bdlora = subconfig(self.use_bdlora, BdLoraConfig, "use_bdlora")
        self.velora_config = subconfig(self.velora_config, VeloraConfig, "velora_config")
        self.kasa_config = subconfig(self.kasa_config, KasaConfig, "kasa_config")
        self.monteclora_config = subconfig(self.monteclora_config, MontecloraConfig, "monteclora_config")
        if self.use_bdlora is not None and self.use_dora:
            raise ValueError("use_bdlora and use_dora cannot be combined")
        if self.velora_config is not None and (self.use_dora or self.use_bdlora is not None):
            raise ValueError("velora_config cannot be combined with use_dora or use_bdlora")
        if self.init_lora_weights == "mica" and (self.use_dora or self.use_bdlora is not None or self.velora_config):
            raise ValueError("init_lora_weights='mica' cannot be combined with use_dora, use_bdlora or velora_config")
        variants = [n for n, on in (("use_dora", self.use_dora), ("use_bdlora", self.use_bdlora is not None),
                                    ("velora_config", self.velora_config is not None),
                                    ("init_lora_weights='mica'", self.init_lora_weights == "mica"),
                                    ("kasa_config", self.kasa_config is not None),
                                    ("monteclora_config", self.monteclora_config is not None)) if on]
        for variant in ("kasa_config", "monteclora_config"):
            others = [n for n in variants if n != variant]
            if variant in variants and (others or self.target_parameters):
                raise ValueError(f"{variant} cannot be combined with {', '.join(others or ['target_parameters'])}")
        if self.trainable_token_indices is not None:
            from oxpeft.tuners.trainable_tokens.config import check_token_indices

            if isinstance(self.trainable_token_indices, dict):
                for layer, indices in self.trainable_token_indices.items():
                    check_token_indices(indices, f"trainable_token_indices[{layer!r}]")
            else:
                check_token_indices(self.trainable_token_indices, "trainable_token_indices")
        if self.loftq_config and self.init_lora_weights != "loftq":
            warnings.warn("loftq_config is set but init_lora_weights is not 'loftq'; it has no effect", stacklevel=3)

    @staticmethod
    def _check_init(init: Any) -> None:
        if isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "loftq", "orthogonal", "mica"):
            return
        if isinstance(init, str) and init.startswith("pissa_niter_") and init[len("pissa_niter_") :].isdigit():
            return
        raise ValueError(
            f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
            "'pissa_niter_<K>', 'olora', 'orthogonal', 'mica' or 'loftq'"
        )

    def _refuse_unsupported(self) -> None:
        used = [name for name in _UNSUPPORTED_FEATURES if getattr(self, name) not in (None, False, {}, [])]
        if self.use_qalora:
            used.append("use_qalora")
        if used:
            raise ValueError(
                f"this LoRA config uses {', '.join(used)}, which oxpeft does not implement; loading it would "
                "silently compute something else, so it is refused"
            )
