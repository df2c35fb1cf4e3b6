"""Adapter configs: the base `PeftConfig`, the `PeftType` / `TaskType` enums, and adapter_config.json I/O.

A config is a dataclass whose JSON form is exactly HF PEFT's `adapter_config.json`: every field, keys
sorted, indent 2, sets written as (sorted) lists. Each method's config class registers itself here by
its `peft_type`, so `PeftConfig.from_pretrained` returns the right subclass.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from oxpeft._io import atomic_write_text
from oxpeft._native import config_downgrade, config_upgrade, config_version_stamp

CONFIG_NAME = "adapter_config.json"

# The HF PEFT release whose on-disk schema oxpeft writes by default. `peft_version` in a saved config
# names that release with oxpeft's own version as a local label ("0.21.2+oxpeft.0.1.0"): PEFT reads the
# release part, and `oxpeft config check` tells that oxpeft wrote the file.
PEFT_SCHEMA_VERSION = "0.21.2"
OXPEFT_PEFT_VERSION = config_version_stamp(PEFT_SCHEMA_VERSION)


class PeftType(str, enum.Enum):
    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


_ConfigT = TypeVar("_ConfigT", bound="PeftConfig")

# peft_type value -> config class; filled by PeftConfig.__init_subclass__.
_CONFIG_CLASSES: dict[str, type["PeftConfig"]] = {}


@dataclass
class PeftConfig:
    """Fields shared by every adapter config (the base keys of PEFT's adapter_config.json)."""

    PEFT_TYPE: ClassVar[PeftType | None] = None

    task_type: str | TaskType | None = None
    peft_type: str | PeftType | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.PEFT_TYPE is not None:
            _CONFIG_CLASSES[cls.PEFT_TYPE.value] = cls

    def __post_init__(self) -> None:
        if self.PEFT_TYPE is not None:
            given = _enum_value(self.peft_type)
            if given is not None and given != self.PEFT_TYPE.value:
                raise ValueError(
                    f"{type(self).__name__} got peft_type={given!r}; it only holds {self.PEFT_TYPE.value} configs"
                )
            self.peft_type = self.PEFT_TYPE
        if self.task_type is not None:
            try:
                self.task_type = TaskType(_enum_value(self.task_type))
            except ValueError:
                known = ", ".join(t.value for t in TaskType)
                raise ValueError(f"unknown task_type {self.task_type!r}; expected one of {known}") from None
        if self.peft_version is None:
            self.peft_version = OXPEFT_PEFT_VERSION

    # --- properties shared by the API -------------------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # --- JSON form --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it: enums as strings, sets as sorted lists, no runtime-only fields."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("runtime_only"):
                continue
            out[f.name] = _to_json_value(getattr(self, f.name))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(
        self, save_directory: str | os.PathLike, peft_version: str | None = None, **overrides: Any
    ) -> None:
        """Write adapter_config.json into `save_directory` (atomically). `overrides` replace fields in the file only.

        With `peft_version` (e.g. "0.10.0") the file holds only the fields that PEFT release knows, so it loads
        there; a feature that release lacks (e.g. DoRA before 0.9) is a ValueError rather than a silent change.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
        data = self.to_dict()
        data["peft_version"] = OXPEFT_PEFT_VERSION  # oxpeft writes this file, whoever wrote the one it was read from
        data.update({k: _to_json_value(v) for k, v in overrides.items()})
        if peft_version is not None:
            data = json.loads(config_downgrade(json.dumps(data), peft_version))
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls: type[_ConfigT], data: dict[str, Any]) -> _ConfigT:
        """Build the config class named by `data["peft_type"]` (or `cls`), refusing fields it does not know."""
        target = _class_for(data, cls)
        known = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{target.__name__} does not know the field(s) {', '.join(unknown)}; "
                "they may come from a newer PEFT release"
            )
        return target(**data)  # type: ignore[return-value]

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return data

    @classmethod
    def from_pretrained(
        cls: type[_ConfigT],
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> _ConfigT:
        """Load adapter_config.json from a local directory or a hub repo id; `kwargs` override fields.

        A config written by any PEFT release (0.3 on) is read into the current schema. Unknown fields with a
        neutral value are dropped with a warning; any other unknown field is a ValueError, or with
        `strict=False` a loud warning (the adapter may then compute something different).
        """
        from oxpeft.hub import resolve_file

        path = resolve_file(
            pretrained_model_name_or_path,
            CONFIG_NAME,
            subfolder=subfolder,
            revision=kwargs.pop("revision", None),
            token=kwargs.pop("token", None),
        )
        data = cls.from_json_file(path)
        try:
            upgraded, notes = config_upgrade(json.dumps(data), strict)
            for note in notes:
                warnings.warn(f"{path}: {note}", stacklevel=2)
            data = json.loads(upgraded)
            data.update(kwargs)
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def _class_for(data: dict[str, Any], default: type[PeftConfig]) -> type[PeftConfig]:
    peft_type = _enum_value(data.get("peft_type"))
    if peft_type is None:
        if default.PEFT_TYPE is None:
            raise ValueError("the config has no 'peft_type'; cannot tell which adapter method it is for")
        return default
    # Importing the tuners registers their config classes.
    import oxpeft.mapping  # noqa: F401

    target = _CONFIG_CLASSES.get(peft_type)
    if target is None:
        known = ", ".join(sorted(_CONFIG_CLASSES))
        raise ValueError(f"unsupported peft_type {peft_type!r}; oxpeft supports {known}")
    if default.PEFT_TYPE is not None and target is not default:
        raise ValueError(f"this is a {peft_type} config, not a {default.PEFT_TYPE.value} config")
    return target


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _to_json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_to_json_value(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _to_json_value(v) for k, v in dataclasses.asdict(value).items()}
    return value


def runtime_field(default: Any) -> Any:
    """A config field that exists at run time only and is never written to adapter_config.json."""
    return field(default=default, metadata={"runtime_only": True})
