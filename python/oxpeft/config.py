"""Adapter configs: the base `PeftConfig`, `PromptLearningConfig`, and adapter_config.json I/O.

A config is a dataclass whose JSON form is exactly HF PEFT's `adapter_config.json`: every field, keys
sorted, indent 2, sets written as (sorted) lists. Each method's config class registers itself here by
its `peft_type` (`register_peft_method`), so `PeftConfig.from_pretrained` returns the right
subclass.
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
from oxpeft.utils.constants import CONFIG_NAME
from oxpeft.utils.peft_types import PEFT_TYPE_TO_CONFIG_MAPPING, PeftType, TaskType, registered_peft_type
from oxpeft._native import config_downgrade, config_upgrade, config_version_stamp

# The HF PEFT release whose on-disk schema oxpeft writes by default. `peft_version` in a saved config
# names that release with oxpeft's own version as a local label ("0.21.2+oxpeft.0.1.0"): PEFT reads the
# release part, and `oxpeft config check` tells that oxpeft wrote the file.
PEFT_SCHEMA_VERSION = "0.21.2"
OXPEFT_PEFT_VERSION = config_version_stamp(PEFT_SCHEMA_VERSION)


_ConfigT = TypeVar("_ConfigT", bound="PeftConfig")



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
        """Load adapter_config.json from a local directory or a hub repo id; `kwargs` override fields, except
        huggingface_hub's download options (cache_dir, force_download, local_files_only, proxies, token, ...).

        A config written by any PEFT release (0.3 on) is read into the current schema. Unknown fields with a
        neutral value are dropped with a warning; any other unknown field is a ValueError, or with
        `strict=False` a loud warning (the adapter may then compute something different).
        """
        from oxpeft.hub import HUB_DOWNLOAD_OPTIONS, resolve_file

        # Download options (what transformers passes along) are not config fields.
        download = {k: kwargs.pop(k) for k in HUB_DOWNLOAD_OPTIONS if k in kwargs}
        kwargs.pop("resume_download", None)  # deprecated by huggingface_hub, which always resumes
        token = kwargs.pop("token", None)
        token = kwargs.pop("use_auth_token", None) if token is None else token
        path = resolve_file(
            pretrained_model_name_or_path,
            CONFIG_NAME,
            subfolder=subfolder,
            revision=kwargs.pop("revision", None),
            token=token,
            **download,
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
    target = PEFT_TYPE_TO_CONFIG_MAPPING[registered_peft_type(peft_type)]
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


# Tasks whose forward and generate know how to feed virtual tokens to the model.
PROMPT_LEARNING_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM)


_Sub = TypeVar("_Sub")


def subconfig(value: Any, cls: type[_Sub], name: str) -> _Sub | None:
    """A nested sub-config field (`velora_config`, `kasa_config`, ...): None, an instance of `cls`, or its dict as
    read from adapter_config.json (fields that `cls` does not take as arguments are dropped, as PEFT does)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        accepted = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in value.items() if k in accepted})
    raise ValueError(f"{name} must be a {cls.__name__} (or its dict), got {type(value).__name__}")


def check_positive_int(config: Any, name: str, *, required: bool = False) -> None:
    value = getattr(config, name)
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        need = "is required and must be" if value is None else "must be"
        raise ValueError(f"{type(config).__name__}: {name} {need} a positive integer, got {value!r}")


def enum_field(config: Any, name: str, enum_cls: type[enum.Enum]) -> None:
    value = getattr(config, name)
    raw = value.value if isinstance(value, enum.Enum) else value
    try:
        setattr(config, name, enum_cls(raw))
    except ValueError:
        allowed = ", ".join(e.value for e in enum_cls)
        raise ValueError(f"{type(config).__name__}: {name}={value!r} is not one of {allowed}") from None


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (PEFT's `PromptLearningConfig`)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "num_virtual_tokens", required=True)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            check_positive_int(self, name)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"{type(self).__name__}: num_transformer_submodules must be 1 (decoder-only / encoder-only) or 2 "
                f"(encoder-decoder), got {self.num_transformer_submodules!r}"
            )
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"{type(self).__name__}: modules_to_save must be a list of module names, not a string")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt embedding: one block of virtual tokens per transformer submodule."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def fill_from_model(self, model_config: Any) -> None:
        """Set the unset model-shape fields from a transformers config, as PEFT does when wrapping a model."""
        if model_config is None:
            model_config = {}
        data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
        if isinstance(data.get("text_config"), dict):
            data = data["text_config"]  # a vision-language model: the prompt goes to the language model

        def first(*keys: str, field: str) -> int:
            for key in keys:
                if data.get(key) is not None:
                    return data[key]
            raise ValueError(
                f"{type(self).__name__}: cannot infer {field} from the model config (none of {', '.join(keys)} is "
                f"set); set {field} in the config"
            )

        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1
        if self.num_layers is None:
            layers = getattr(model_config, "num_hidden_layers", None)
            self.num_layers = layers if layers is not None else first(
                "num_hidden_layers", "num_layers", "n_layer", field="num_layers"
            )
        if self.token_dim is None:
            self.token_dim = first("hidden_size", "n_embd", "d_model", field="token_dim")
        if self.num_attention_heads is None:
            self.num_attention_heads = first(
                "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", field="num_attention_heads"
            )
        self._fill_method_fields(data)

    def _fill_method_fields(self, model_config: dict[str, Any]) -> None:
        """Method-specific fields derived from the model config (after the shared ones are set)."""
