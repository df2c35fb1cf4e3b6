"""LoftQ: initialise LoRA on a quantised base so that the quantised weight plus the adapter stays
close to the original weight.

The work runs in Rust (``oxpeft._native.loftq_init``): the alternating loop of quantisation and a
rank-r SVD of the residual, with a randomised truncated SVD by default. Unlike HF PEFT, the
factors are divided by the adapter's LoRA scaling, so the adapter's effective delta
``scaling * lora_B @ lora_A`` (not ``lora_B @ lora_A``) is what approximates ``W - deq(Q)``
(PEFT issue #1982). It runs on CPU; weights on other devices are moved to CPU for the
computation and the results moved back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from oxpeft import _native

__all__ = ["LoftQConfig", "loftq_initialize", "replace_lora_weights_loftq"]

_SUPPORTED_BITS = (4, 8)


@dataclass
class LoftQConfig:
    """LoftQ settings, with HF PEFT's field names; stored in ``adapter_config.json`` as the
    ``loftq_config`` dict of a LoraConfig.

    Args:
        loftq_bits: bits of the base weight: 4 (NF4 / FP4, the base layer's quant type) or 8 (int8).
        loftq_iter: alternating iterations T (PEFT's default 1; the LoftQ paper uses 5).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.loftq_bits, bool) or self.loftq_bits not in _SUPPORTED_BITS:
            raise ValueError(f"LoftQConfig.loftq_bits must be 4 or 8, got {self.loftq_bits!r}")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"LoftQConfig.loftq_iter must be an integer >= 1, got {self.loftq_iter!r}")

    def to_dict(self) -> dict[str, int]:
        """The ``loftq_config`` dict as PEFT writes it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoftQConfig:
        """Read a ``loftq_config`` dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"loftq_config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)


def _cpu_float32(tensor: torch.Tensor) -> torch.Tensor:
    # No copy when the tensor already is contiguous CPU float32: numpy then shares its memory.
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


@torch.no_grad()
def loftq_initialize(
    weight: torch.Tensor,
    rank: int,
    scaling: float,
    config: LoftQConfig,
    exact_svd: bool = False,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ-initialise one linear weight.

    Args:
        weight: ``(out_features, in_features)`` weight, any device and floating dtype.
        rank: LoRA rank r.
        scaling: the adapter's LoRA scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
        config: bits and iterations.
        exact_svd: use a full SVD instead of the randomised truncated one (slow; a reference).
        quant_type: ``"nf4"`` or ``"fp4"`` for 4 bits (ignored for 8 bits).
        blocksize: 4-bit quantisation block size.

    Returns:
        ``(dequantized_weight, lora_A, lora_B)`` on the weight's device and in its dtype:
        ``deq(Q)`` of shape ``(out, in)`` (what the quantised base holds), ``lora_A`` of shape
        ``(r, in)`` and ``lora_B`` of shape ``(out, r)``, with
        ``dequantized_weight + scaling * lora_B @ lora_A ~ weight``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"LoftQ: weight must be a 2-D (out_features, in_features) tensor, got {shape}")
    deq, lora_a, lora_b, _ = _native.loftq_init(
        _cpu_float32(weight).numpy(),
        rank,
        config.loftq_iter,
        float(scaling),
        bits=config.loftq_bits,
        quant_type=quant_type,
        blocksize=blocksize,
        exact_svd=exact_svd,
    )

    def back(array: Any) -> torch.Tensor:
        return torch.from_numpy(array).to(device=weight.device, dtype=weight.dtype)

    return back(deq), back(lora_a), back(lora_b)


class _CheckpointWeights:
    """Reads single tensors lazily from a model's safetensors checkpoint (one file or sharded)."""

    def __init__(self, model_path: str, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._handles: dict[str, Any] = {}
        single = model_path if os.path.isfile(model_path) else os.path.join(model_path, "model.safetensors")
        index = os.path.join(model_path, "model.safetensors.index.json")
        if os.path.isfile(single):
            # Only the header is read here; tensors are read one at a time in get().
            self._where = dict.fromkeys(self._open(single).keys(), single)
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                    self._where = {name: os.path.join(model_path, shard) for name, shard in weight_map.items()}
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    raise ValueError(f"{index}: not a safetensors index with a 'weight_map'") from exc
        else:
            raise FileNotFoundError(
                f"{model_path}: no safetensors checkpoint (expected a .safetensors file, or a folder with "
                "model.safetensors or model.safetensors.index.json)"
            )

    def _open(self, path: str) -> Any:
        if path not in self._handles:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: checkpoint shard not found")
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self._handles[path]

    def locate(self, candidates: list[str]) -> tuple[str, tuple[int, ...]] | None:
        """The first of ``candidates`` (tensor names) the checkpoint holds, with its shape (header only)."""
        for name in candidates:
            if name in self._where:
                return name, tuple(self._open(self._where[name]).get_slice(name).get_shape())
        return None

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._where[name]).get_tensor(name)


def _resolve_model_path(peft_model: torch.nn.Module, model_path: str | None) -> str:
    if model_path is not None:
        return os.fspath(model_path)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "replace_lora_weights_loftq: the model does not name its checkpoint (config._name_or_path); "
            "pass model_path, the safetensors file or folder of the original weights"
        )
    if os.path.exists(name):
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception as exc:  # the hub client raises several types for "not in the local cache"
        raise FileNotFoundError(
            f"replace_lora_weights_loftq: checkpoint '{name}' is neither a local path nor in the Hugging Face "
            "cache; pass model_path"
        ) from exc


def _lora_layers(model: torch.nn.Module, adapter_name: str) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter_name in lora_a and hasattr(module.base_layer, "dequantize"):
            yield name, module


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: torch.nn.Module,
    model_path: str | os.PathLike[str] | None = None,
    adapter_name: str = "default",
    callback: Callable[[torch.nn.Module, str], bool] | None = None,
    exact_svd: bool = False,
) -> None:
    """Re-initialise the LoRA weights of an already quantised model with LoftQ.

    For every LoRA layer whose base layer is quantised (has ``.dequantize()``), the original weight
    is read lazily from the checkpoint's safetensors files and the adapter set so that
    ``deq(Q) + scaling * lora_B @ lora_A`` is as close to it as rank r allows. The quantised base is
    not changed, so this is LoftQ with one iteration.

    Args:
        peft_model: a model with LoRA layers on quantised base layers.
        model_path: a ``.safetensors`` file, or a folder with ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``; by default the base model's ``config._name_or_path``
            (a local folder or the local Hugging Face cache, never downloaded).
        adapter_name: the adapter to re-initialise.
        callback: called as ``callback(peft_model, module_name)`` after each layer is replaced; when it
            returns False the layer's previous LoRA weights are put back.
        exact_svd: use a full SVD instead of the randomised truncated one.
    """
    layers = list(_lora_layers(peft_model, adapter_name))
    if not layers:
        raise ValueError(
            f"replace_lora_weights_loftq: no LoRA layer of adapter '{adapter_name}' on a quantised base layer "
            "(one with .dequantize()) in the model"
        )
    path = _resolve_model_path(peft_model, model_path)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    base_prefix = getattr(base, "base_model_prefix", "") or ""

    with contextlib.ExitStack() as stack:
        checkpoint = _CheckpointWeights(path, stack)
        # Find every tensor and check its shape before touching any layer, so that a bad
        # checkpoint leaves the model as it was.
        plan = []
        for name, module in layers:
            name = name.removeprefix("base_model.model.")
            candidates = [f"{name}.weight"]
            if base_prefix and name.startswith(base_prefix + "."):
                candidates.append(f"{name[len(base_prefix) + 1 :]}.weight")
            found = checkpoint.locate(candidates)
            if found is None:
                raise KeyError(
                    f"replace_lora_weights_loftq: {path}: layer '{name}': none of {candidates} is in the checkpoint"
                )
            expected = (module.lora_B[adapter_name].weight.shape[0], module.lora_A[adapter_name].weight.shape[1])
            if found[1] != expected:
                raise ValueError(
                    f"replace_lora_weights_loftq: layer '{name}': checkpoint tensor '{found[0]}' has shape "
                    f"{found[1]}, the layer is {expected} (out_features, in_features)"
                )
            plan.append((name, module, found[0]))

        for name, module, tensor_name in tqdm(plan, desc="LoftQ", unit="layer"):
            lora_a_param = module.lora_A[adapter_name].weight
            lora_b_param = module.lora_B[adapter_name].weight
            lora_a, lora_b, _ = _native.loftq_fit_fixed_base(
                _cpu_float32(checkpoint.get(tensor_name)).numpy(),
                _cpu_float32(module.base_layer.dequantize()).numpy(),
                lora_a_param.shape[0],
                float(module.scaling[adapter_name]),
                exact_svd=exact_svd,
            )
            previous = (lora_a_param.detach().clone(), lora_b_param.detach().clone()) if callback else None
            lora_a_param.copy_(torch.from_numpy(lora_a))
            lora_b_param.copy_(torch.from_numpy(lora_b))
            if previous is not None and not callback(peft_model, name):
                lora_a_param.copy_(previous[0])
                lora_b_param.copy_(previous[1])
