"""`AdaLoraConfig`: HF PEFT's field names and defaults, so AdaLoRA adapter_config.json files move both ways.

HF PEFT's AdaLoraConfig extends its LoraConfig, so an ADALORA adapter_config.json carries every LoRA field. The
ones AdaLoRA has no use for are kept here so that such files load and are written back identically; a
non-neutral value in one of them is refused with a clear error rather than silently ignored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from oxpeft.config import PeftConfig
from oxpeft.utils.peft_types import PeftType

# LoRA fields that AdaLoRA does not implement, with the values that mean "off".
_NEUTRAL_LORA_FIELDS: dict[str, Any] = {
    "use_rslora": False,
    "alpha_pattern": {},
    "megatron_config": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}


@dataclass
class AdaLoraConfig(PeftConfig):
    """Configuration of an AdaLoRA adapter (https://openreview.net/forum?id=lq62uWRJjiY).

    Each target gets an SVD-form adapter ``delta = B @ (A * E) * lora_alpha / ranknum`` of rank `init_r`.
    Training runs in three phases over `total_step` steps (required): `tinit` warm-up steps at full rank, then the
    total rank budget falls on a cubic schedule from ``init_r * n_modules`` to ``target_r * n_modules``, pruning
    the least important singular triplets every `deltaT` steps (importance smoothed with `beta1` / `beta2`), and
    the last `tfinal` steps train with the final ranks fixed. `orth_reg_weight` weighs the orthogonality penalty
    on A and B that is added to the loss in training. The final `rank_pattern` (module -> kept-triplet mask) is
    saved, and loading resizes the adapters to it. `r` is not used (set `init_r`).
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADALORA

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    # LoRA fields HF PEFT writes into every ADALORA config (see _NEUTRAL_LORA_FIELDS).
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[tuple[int, int]] | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, set(getattr(self, name)))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError("modules_to_save must be a list of module names, not a string")
            self.modules_to_save = list(self.modules_to_save)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"init_lora_weights must be True or False for AdaLoRA, got {self.init_lora_weights!r}")
        self._check_schedule()
        self._check_rank_pattern()
        used = [name for name, off in _NEUTRAL_LORA_FIELDS.items() if getattr(self, name) != off]
        if used:
            raise ValueError(
                f"this AdaLoRA config sets {', '.join(used)}, which AdaLoRA does not support; loading it would "
                "silently compute something else, so it is refused"
            )
        if self.r != 8:
            warnings.warn("AdaLoRA does not use r; set init_r (the starting rank) instead", stacklevel=3)

    def _check_schedule(self) -> None:
        def positive_int(name: str, minimum: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
            return value

        if self.total_step is None:
            raise ValueError("AdaLoRA needs total_step (the number of training steps) to plan its rank budget")
        total = positive_int("total_step", 1)
        init_r, target_r = positive_int("init_r", 1), positive_int("target_r", 1)
        tinit, tfinal = positive_int("tinit", 0), positive_int("tfinal", 0)
        positive_int("deltaT", 1)
        if target_r > init_r:
            raise ValueError(f"target_r ({target_r}) must not exceed init_r ({init_r}): AdaLoRA only prunes ranks")
        if tinit >= total - tfinal:
            raise ValueError(
                f"tinit ({tinit}) must be below total_step - tfinal ({total} - {tfinal} = {total - tfinal}), "
                "or no step is left for pruning; lower tinit / tfinal or raise total_step"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if float(self.orth_reg_weight) < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must map module names to lists of booleans, got {self.rank_pattern!r}")
        for key, mask in self.rank_pattern.items():
            if not isinstance(mask, list) or not all(isinstance(v, bool) or v in (0, 1) for v in mask):
                raise ValueError(f"rank_pattern[{key!r}] must be a list of booleans (kept triplets), got {mask!r}")
