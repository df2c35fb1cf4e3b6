"""`add_weighted_adapter`: combine existing LoRA adapters into a new one.

Combination types (the same results as HF PEFT on the same inputs):
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: combine A and B separately with
  weights ``sign(w) * sqrt(|w * scaling|)`` on A and ``sqrt(|w * scaling|)`` on B (all ranks equal);
- ``cat``: stack the adapters (rank = sum of ranks), exact: the new delta is the weighted sum of deltas;
- ``svd`` and the ``*_svd`` variants: combine the full deltas, then truncate to ``svd_rank`` by SVD.
The new adapter has ``lora_alpha = r`` (scaling 1), since the scalings are folded into its weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import torch

from oxpeft.tuners.lora.bdlora import factor_weight
from oxpeft.tuners.tuners_utils import check_adapters_to_combine, union_module_names
from oxpeft.tuners.lora.layer import Embedding, LoraLayer, _ConvNd

if TYPE_CHECKING:
    from oxpeft.tuners.lora.model import LoraModel

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SignMethod = Literal["total", "frequency"]


# --- task-arithmetic primitives (TIES / DARE papers) ------------------------------------------------------------
def _keep_top_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view_as(t)


def _keep_random(t: torch.Tensor, density: float) -> torch.Tensor:
    kept = t * torch.bernoulli(torch.full_like(t, density))
    return kept / density


def _prune(t: torch.Tensor, density: float, how: str) -> torch.Tensor:
    if density >= 1:
        return t
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return _keep_top_magnitude(t, density) if how == "magnitude" else _keep_random(t, density)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _sign_agreement(stacked: torch.Tensor, method: SignMethod) -> torch.Tensor:
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    majority = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == majority


def combine(
    kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, sign: SignMethod
) -> torch.Tensor:
    """Combine task tensors by `kind` (the name without a ``_svd`` suffix)."""
    if kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune") and density is None:
        raise ValueError(f"combination_type '{kind}' needs a density in [0, 1]")
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude") for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random") for t in tensors]
    stacked = torch.stack(tensors)
    weighted = _weighted(stacked, weights)
    if kind in ("ties", "dare_ties"):
        agree = _sign_agreement(stacked, sign)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return weighted.sum(dim=0)


# --- the operation ---------------------------------------------------------------------------------------------
def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if adapter in layer.lora_A:
        return factor_weight(layer.lora_A[adapter]), factor_weight(layer.lora_B[adapter])
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _new_rank(model: "LoraModel", adapters: list[str], kind: str, svd_rank: int | None) -> int:
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in (model.peft_config[a] for a in adapters)]
    if kind in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type '{kind}' needs adapters of equal rank, got ranks {ranks}; use 'cat' or 'svd'")
        return ranks[0]
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_TYPES:
        return svd_rank or max(ranks)
    raise ValueError(f"unknown combination_type {kind!r}; choose from {FACTOR_TYPES + ('cat',) + SVD_TYPES}")


@torch.no_grad()
def add_weighted_adapter(
    model: "LoraModel",
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
) -> None:
    check_adapters_to_combine(model, adapters, weights)
    if any(model.peft_config[a].use_dora for a in adapters):
        raise ValueError("add_weighted_adapter cannot combine DoRA adapters (their magnitudes do not add up)")
    kind = "linear" if len(adapters) == 1 else combination_type
    rank = _new_rank(model, adapters, kind, svd_rank)
    if kind.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune") and density is None:
        raise ValueError(f"combination_type '{kind}' needs a density in [0, 1]")
    config = dataclasses.replace(
        model.peft_config[adapters[0]],
        r=rank,
        lora_alpha=rank,
        target_modules=union_module_names([model.peft_config[a].target_modules for a in adapters], "target_modules"),
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=True,
    )
    model.inject_adapter(adapter_name, config)
    model._freeze_adapter(adapter_name)
    try:
        _fill(model, adapters, weights, adapter_name, kind, rank, svd_clamp, svd_full_matrices, density,
              majority_sign_method)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def _fill(
    model: "LoraModel",
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    kind: str,
    rank: int,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    density: float | None,
    majority_sign_method: SignMethod,
) -> None:
    for module in model.model.modules():
        if not isinstance(module, LoraLayer) or _factors(module, adapter_name) is None:
            continue
        new_a, new_b = _factors(module, adapter_name)
        present = [(a, w) for a, w in zip(adapters, weights) if _factors(module, a) is not None]
        if kind == "cat":
            a_parts = [_factors(module, a)[0] * (w * module.scaling[a]) for a, w in present]
            b_parts = [_factors(module, a)[1] for a, _ in present]
            a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
            new_a.zero_()
            new_b.zero_()
            new_a[: a_cat.shape[0]] = a_cat
            new_b[:, : b_cat.shape[1]] = b_cat
        elif kind in SVD_TYPES:
            a, b = _svd_factors(module, present, kind[: -len("_svd")] if kind != "svd" else "linear", rank,
                                density, majority_sign_method, svd_clamp, svd_full_matrices)
            new_a.copy_(a.reshape(new_a.shape))
            new_b.copy_(b.reshape(new_b.shape))
        else:
            scaled = [w * module.scaling[a] for a, w in present]
            w_a = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
            w_b = torch.tensor([math.sqrt(abs(s)) for s in scaled])
            a_list = [_factors(module, a)[0].float() for a, _ in present]
            b_list = [_factors(module, a)[1].float() for a, _ in present]
            new_a.copy_(combine(kind, a_list, w_a, density, majority_sign_method))
            new_b.copy_(combine(kind, b_list, w_b, density, majority_sign_method))


def _svd_factors(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    kind: str,
    rank: int,
    density: float | None,
    sign: SignMethod,
    clamp: float | None,
    full_matrices: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [layer.get_delta_weight(a) for a, _ in present]
    delta = combine(kind, deltas, torch.tensor([w for _, w in present], dtype=deltas[0].dtype), density, sign)
    if isinstance(layer, _ConvNd):
        delta = delta.flatten(start_dim=1)
    if layer.fan_in_fan_out or isinstance(layer, Embedding):
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    u = u[:, :rank] * s[:rank]
    vh = vh[:rank]
    if clamp is not None:
        limit = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-limit, limit), vh.clamp(-limit, limit)
    return vh, u
