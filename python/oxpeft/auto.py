"""`AutoPeftModel*`: load an adapter together with the base model its config names, in one call.

    model = AutoPeftModelForCausalLM.from_pretrained("my-adapter")   # base from base_model_name_or_path

The base model is loaded with the transformers Auto class of the adapter's task type (or, for an adapter without
one, the class its config's `auto_mapping` records, from a library in `import_allowlist`). If the adapter folder
holds a tokenizer with more tokens than the base model's embeddings, the embeddings are resized to it first, as
training with added tokens requires.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.hub import resolve_file
from oxpeft.peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from oxpeft.utils.peft_types import TaskType

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]

# Libraries whose model classes an adapter config's `auto_mapping` may name.
DEFAULT_IMPORT_ALLOWLIST = ("transformers", "diffusers", "timm")
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


class _BaseAutoPeftModel:
    #: The transformers Auto class name the base model is loaded with (None: from the config's auto_mapping).
    _target_class: str | None = None
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model named by the adapter's config, with the adapter loaded as `adapter_name`.

        `kwargs` go to the base model's `from_pretrained` (e.g. `dtype`, `device_map`, `quantization_config`);
        `token` is also used for the adapter's files.
        """
        token = kwargs.get("token")
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, token=token)
        if not peft_config.base_model_name_or_path:
            raise ValueError(
                f"{pretrained_model_name_or_path}: the adapter config has no base_model_name_or_path, so the base "
                "model is unknown; load it yourself and use PeftModel.from_pretrained(model, path)"
            )
        base_model = cls._base_model_class(peft_config, import_allowlist).from_pretrained(
            peft_config.base_model_name_or_path, revision=peft_config.revision, **kwargs
        )
        _fit_embeddings_to_tokenizer(base_model, pretrained_model_name_or_path, revision, token)
        return cls._target_peft_class.from_pretrained(
            base_model,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=peft_config,
            revision=revision,
            token=token,
        )

    @classmethod
    def _base_model_class(cls, config: PeftConfig, import_allowlist: list[str] | None) -> Any:
        task_type = config.task_type
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TaskType(task_type)]
            if cls._target_class is None:
                raise ValueError(
                    f"the adapter is for task_type={TaskType(task_type).value}; use "
                    f"AutoPeftModelFor{expected.__name__.removeprefix('PeftModelFor')} instead of {cls.__name__}"
                )
            if cls._target_peft_class is not expected:
                raise ValueError(
                    f"the adapter is for task_type={TaskType(task_type).value} ({expected.__name__}), not for "
                    f"{cls._target_peft_class.__name__}: use the matching AutoPeftModel class"
                )
        if cls._target_class is not None:
            return getattr(importlib.import_module("transformers"), cls._target_class)
        mapping = config.auto_mapping or {}
        if not mapping.get("base_model_class") or not mapping.get("parent_library"):
            raise ValueError(
                "cannot tell which class the base model is: the adapter config has neither a task_type nor an "
                "auto_mapping; use the AutoPeftModelFor<Task> class of its task"
            )
        library = mapping["parent_library"]
        allowed = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else tuple(import_allowlist)
        if library.split(".")[0] not in allowed:
            raise ValueError(
                f"the adapter config's auto_mapping would import {library!r}, which is not in the import allowlist "
                f"{list(allowed)}; pass import_allowlist=[{library.split('.')[0]!r}] if you trust it"
            )
        return getattr(importlib.import_module(library), mapping["base_model_class"])


def _fit_embeddings_to_tokenizer(model: nn.Module, adapter: str | os.PathLike, revision: str | None, token: Any) -> None:
    """Grow the model's input embeddings to the adapter's tokenizer, if the adapter folder has a larger one."""
    if not hasattr(model, "get_input_embeddings"):
        return
    try:
        found = resolve_file(adapter, TOKENIZER_CONFIG_NAME, revision=revision, token=token, required=False)
    except (FileNotFoundError, OSError):
        found = None
    if found is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(found), revision=revision, token=token)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """For adapters without a task type: the base model class comes from the config's `auto_mapping`."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
