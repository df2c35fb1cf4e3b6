"""`IA3Config`: HF PEFT's field names and defaults, so (IA)³ adapter_config.json files move both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from oxpeft.config import PeftConfig
from oxpeft.utils.peft_types import PeftType


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)³ adapter: learned vectors that rescale activations (https://arxiv.org/abs/2205.05638).

    - `target_modules`: module names (a name matches a module whose full name equals it or ends with ``"." + name``),
      a regex that must match the whole module name, ``"all-linear"``, or None for the architecture's default.
      Every list entry that matches no module is an error.
    - `feedforward_modules`: the targets whose INPUT is scaled (vector shape (1, in)); the other targets have their
      OUTPUT scaled (vector shape (out, 1)). A list must be a subset of `target_modules`; None takes the
      architecture's default. As in HF PEFT, a list entry marks every target whose name ends with it.
    - `init_ia3_weights`: start from ones (the identity); False leaves random vectors (for tests).
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.IA3

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    feedforward_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError("modules_to_save must be a list of module names, not a string")
            self.modules_to_save = list(self.modules_to_save)
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = sorted(self.feedforward_modules - self.target_modules)
            if extra:
                raise ValueError(
                    f"feedforward_modules must be a subset of target_modules; not in target_modules: {extra}"
                )
