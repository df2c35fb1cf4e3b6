"""The README.md model card written beside a saved adapter, as PEFT writes it: `library_name: peft` (what the
Hub and transformers' Trainer look for), the base model, tags, and the versions that wrote the files. An existing
card keeps its text and fields; only these are set."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from oxpeft._io import atomic_write_text
from oxpeft.config import PEFT_SCHEMA_VERSION

__all__ = ["write_model_card"]

_FRAMEWORK_HEADING = "### Framework versions"
_QUANTISATION_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


def write_model_card(output_dir: str | os.PathLike, base_model: nn.Module, peft_type: str, causal_lm: bool) -> None:
    """Create or update `output_dir/README.md` for an adapter of `peft_type` on `base_model`."""
    from huggingface_hub import ModelCard, ModelCardData

    import oxpeft

    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = set(getattr(base_model, "model_tags", None) or [])
    config = _config_dict(base_model)
    if _is_transformers_model(base_model):
        tags.add("transformers")
    if peft_type == "LORA":
        tags.add("lora")
    if hasattr(base_model, "name_or_path"):
        tags.add(f"base_model:adapter:{base_model.name_or_path}")
    if tags:
        card.data["tags"] = sorted(tags)
    if causal_lm and not card.data.pipeline_tag:
        card.data.pipeline_tag = "text-generation"
    if config is not None and "_name_or_path" in config:
        card.data["base_model"] = config["_name_or_path"]

    lines = card.text.splitlines()
    quantisation = (config or {}).get("quantization_config")
    if quantisation and _QUANTISATION_PREFIX not in lines:
        lines += ["## Training procedure", "", _QUANTISATION_PREFIX]
        lines += [f"- {key}: {value}" for key, value in quantisation.items()]
    versions = [f"- PEFT {PEFT_SCHEMA_VERSION} (file format)", f"- oxpeft {oxpeft.__version__}"]
    missing = [line for line in versions if line not in lines]
    if missing:
        if _FRAMEWORK_HEADING in lines:
            at = lines.index(_FRAMEWORK_HEADING) + 2
            lines[at:at] = missing
        else:
            lines += [_FRAMEWORK_HEADING, "", *missing]
    card.text = "\n".join(lines)
    atomic_write_text(path, str(card))


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)
