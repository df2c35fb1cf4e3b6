"""`load_quantized`: build a model on the meta device and quantise its checkpoint tensor by tensor."""

from __future__ import annotations

import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from oxpeft.quant.config import QuantizationConfig
from oxpeft.quant.linear4bit import Linear4bit
from oxpeft.quant.linear8bit import Linear8bit
from oxpeft.quant.model import linear_names_to_quantize

__all__ = ["load_quantized"]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = [model_dir / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: checkpoint file not found")
    return files


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class _TensorFile:
    """Reads one safetensors file tensor by tensor with plain reads.

    Unlike an mmap (`safe_open`), whose touched pages count towards the process's resident memory
    until the file is closed, each read lands in a fresh tensor that is freed once quantised, so the
    process holds at most one full-precision tensor at a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb")
        size = os.fstat(self.file.fileno()).st_size
        head = self.file.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > 100_000_000 or 8 + n > size:
            raise ValueError(f"{path}: header length {n} is invalid for a {size}-byte file")
        try:
            header = json.loads(self.file.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: header is not UTF-8 JSON ({exc})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = _ST_DTYPES[entry["dtype"]]
                shape = [int(d) for d in entry["shape"]]
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: tensor '{name}' has a malformed entry {entry!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or begin < 0 or self.data_start + end > size:
                raise ValueError(f"{path}: tensor '{name}' ({entry['dtype']} {shape}) has offsets {begin}..{end} that do not fit")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str, transient: bool = False) -> torch.Tensor:
        """The tensor `name` on CPU. A `transient` one (read, quantised, dropped) lives in its own
        anonymous mapping, returned to the OS the moment the tensor is freed; through malloc,
        tens of MB freed between long-lived allocations fragment the heap instead."""
        dtype, shape, begin, end = self.entries[name]
        if transient and end > begin:
            buffer = mmap.mmap(-1, end - begin)
            tensor = torch.frombuffer(buffer, dtype=dtype).view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        self.file.seek(self.data_start + begin)
        if self.file.readinto(view) != end - begin:
            raise ValueError(f"{self.path}: tensor '{name}' is truncated")
        return tensor

    def __enter__(self) -> "_TensorFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def _meta_model(model_dir: Path, model_class: Any, dtype: Optional[torch.dtype]) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if dtype is None:
            return model_class.from_config(config)
        return model_class.from_config(config, dtype=dtype)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    owner_name, _, leaf = key.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        raise KeyError(key) from None
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        target = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{key}: checkpoint shape {list(value.shape)} does not match the model's {list(old.shape)}")
        owner._parameters[leaf] = nn.Parameter(value.to(target), requires_grad=old.requires_grad if old is not None else True)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(key)


def _owner_module(key: str) -> str:
    """The module a checkpoint key belongs to, including bitsandbytes' quantisation entries."""
    for marker in (".weight.", ".SCB", ".weight_format"):
        if marker in key:
            return key.split(marker)[0]
    return key.rpartition(".")[0]


def _materialise_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers computed at construction (rotary `inv_freq`, ...) are not in checkpoints; rebuild
    them on CPU with the model's own initialiser."""
    init = getattr(model, "_init_weights", None)
    for name, module in model.named_modules():
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        for b in meta:
            module._buffers[b] = torch.empty_like(module._buffers[b], device="cpu")
        if not callable(init):
            raise ValueError(f"{name}: buffers {meta} are not in the checkpoint and the model cannot initialise them")
        init(module)


def load_quantized(
    model_dir: str | os.PathLike,
    config: Optional[QuantizationConfig] = None,
    model_class: Any = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Loads a transformers model from `model_dir` with its Linear layers quantised.

    The model is built on the meta device, then each tensor is read from the safetensors
    checkpoint (one at a time, with plain reads rather than an mmap) and either quantised straight
    into its `Linear4bit` / `Linear8bit` or placed as is, so peak memory stays near the quantised
    model's size plus one full-precision tensor. A checkpoint that is
    already quantised in bitsandbytes' layout (`weight.absmax`, `SCB`, ...) is loaded without
    requantising. `dtype`, when given, casts the tensors that stay in full precision; by default
    they keep the checkpoint's dtype. Returns the model in eval mode on CPU.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    config = config or QuantizationConfig()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    files = _checkpoint_files(model_dir)
    model = _meta_model(model_dir, model_class, dtype)
    targets = set(linear_names_to_quantize(model, config))
    for name in targets:
        linear = model.get_submodule(name)
        if config.load_in_4bit:
            module: nn.Module = Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=config.compute_dtype,
                quant_type=config.bnb_4bit_quant_type,
                compress_statistics=config.bnb_4bit_use_double_quant,
                blocksize=config.blocksize,
                device="meta",
            )
        else:
            module = Linear8bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=config.compute_dtype,
                device="meta",
                threshold=config.llm_int8_threshold,
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    # Entries of quantised layers other than a full-precision weight: biases and, for a
    # checkpoint saved already quantised, the packed weight and its quantisation state.
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unused: list[str] = []
    for path in files:
        with _TensorFile(path) as reader:
            for key in reader.keys():
                module_name = _owner_module(key)
                if module_name in targets:
                    is_weight = key == f"{module_name}.weight" and reader.entries[key][0].is_floating_point
                    tensor = reader.get_tensor(key, transient=is_weight)
                    if is_weight:
                        model.get_submodule(module_name).set_weight(tensor, name=f"{path.name}: {key}")
                    else:
                        pending.setdefault(module_name, {})[key[len(module_name) + 1 :]] = tensor
                    del tensor
                    continue
                try:
                    _set_tensor(model, key, reader.get_tensor(key), dtype)
                except KeyError:
                    unused.append(key)  # a tensor the architecture does not use (e.g. an old rotary buffer)
    if unused:
        warnings.warn(f"{model_dir}: {len(unused)} checkpoint tensor(s) the model does not use were skipped, e.g. {unused[:5]}", stacklevel=2)
    for module_name, items in pending.items():
        module = model.get_submodule(module_name)
        if set(items) == {"bias"}:
            module.bias = nn.Parameter(items["bias"].to(dtype or module.bias.dtype), requires_grad=True)
            continue
        try:
            module.load_state_dict(items, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{model_dir}: pre-quantised entries of {module_name} do not fit: {exc}") from None

    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    _materialise_non_persistent_buffers(model)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and (module.weight.is_meta or module.quant_state.absmax.is_meta):
            missing.append(f"{name}.weight")
        if isinstance(module, Linear8bit) and module.SCB.is_meta:
            missing.append(f"{name}.SCB")
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {sorted(set(missing))[:5]}")
    model.is_loaded_in_4bit = bool(config.load_in_4bit)
    model.is_loaded_in_8bit = bool(config.load_in_8bit)
    return model.eval()
