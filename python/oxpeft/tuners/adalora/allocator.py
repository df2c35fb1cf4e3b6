"""AdaLoRA's rank allocator: importance scores for every singular triplet and the budget schedule that prunes them.

Importance of a parameter entry is ``|p * grad|``, smoothed by an EMA (`beta1`) and multiplied by an EMA of its
deviation from that average (`beta2`, the uncertainty). The score of triplet i of a module is
``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``. The total budget (sum of kept ranks over all modules) stays at
``init_r * n`` for `tinit` steps, falls cubically to ``target_r * n`` at step ``total_step - tfinal``, and the
lowest-scoring triplets beyond the budget are masked (their E entry set to 0).
"""

from __future__ import annotations

import torch

from oxpeft.tuners.adalora.config import AdaLoraConfig
from oxpeft.tuners.adalora.layer import AdaLoraLayer

_PARAMS = ("lora_A", "lora_E", "lora_B")


def rank_pattern_key(module_key: str) -> str:
    """The rank_pattern key of a module, as HF PEFT writes it (the name of its lora_E, without the adapter)."""
    return f"{module_key}.lora_E"


def rank_mask(rank_pattern: dict[str, list[bool]], module_key: str, adapter_name: str) -> list[bool] | None:
    """A module's kept-triplet mask; HF PEFT's in-memory patterns still carry the adapter name in their keys."""
    key = rank_pattern_key(module_key)
    mask = rank_pattern.get(key)
    return rank_pattern.get(f"{key}.{adapter_name}") if mask is None else mask


class RankAllocator:
    """Tracks importance for one adapter's layers (`layers`: module key -> layer) and masks them to the budget."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, AdaLoraLayer], adapter_name: str) -> None:
        self.config = config
        self.layers = dict(sorted(layers.items()))
        self.adapter_name = adapter_name
        self.init_budget = sum(layer.r[adapter_name] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.reset_importance()

    def reset_importance(self) -> None:
        self._avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self._avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget at `step`, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for key, layer in self.layers.items():
            for attr in _PARAMS:
                p = getattr(layer, attr)[self.adapter_name]
                if p.grad is None:
                    raise ValueError(
                        f"'{key}.{attr}' has no gradient: call update_and_allocate(step) after loss.backward() and "
                        "before optimizer.zero_grad()"
                    )
                ipt = (p * p.grad).abs()
                avg = self._avg_ipt.get((key, attr))
                unc = self._avg_unc.get((key, attr))
                if avg is None:
                    avg, unc = torch.zeros_like(p), torch.zeros_like(p)
                avg = beta1 * avg + (1 - beta1) * ipt
                self._avg_ipt[(key, attr)] = avg
                self._avg_unc[(key, attr)] = beta2 * unc + (1 - beta2) * (ipt - avg).abs()

    def _triplet_scores(self, key: str) -> torch.Tensor:
        def score(attr: str) -> torch.Tensor:
            return self._avg_ipt[(key, attr)] * self._avg_unc[(key, attr)]

        return score("lora_E").view(-1) + score("lora_A").mean(dim=1) + score("lora_B").mean(dim=0)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Mask the lowest-scoring triplets so that about `budget` remain; returns the rank pattern (kept masks)."""
        if not self._avg_ipt:
            raise ValueError("no importance scores yet: update_and_allocate must run on steps with gradients first")
        scores = {key: self._triplet_scores(key) for key in self.layers}
        to_prune = self.init_budget - budget
        if to_prune > 0:
            threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k=to_prune).values.item()
        else:
            threshold = float("-inf")
        pattern: dict[str, list[bool]] = {}
        for key, layer in self.layers.items():
            keep = scores[key] > threshold
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[rank_pattern_key(key)] = keep.view(-1).tolist()
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero the E entries of the triplets the pattern prunes (keeps them pruned while training goes on)."""
        for key, layer in self.layers.items():
            mask = rank_mask(rank_pattern, key, self.adapter_name)
            if mask is None:
                continue
            e = layer.lora_E[self.adapter_name]
            keep = torch.tensor(mask, dtype=torch.bool, device=e.device).view(-1, 1)
            e.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, step: int, force_mask: bool = False) -> dict[str, list[bool]] | None:
        """Update importance (before the final phase) and mask to the step's budget when the schedule says so."""
        if step < self.config.total_step - self.config.tfinal:
            self.update_importance()
        budget, mask_now = self.budget_schedule(step)
        if mask_now or force_mask:
            return self.mask_to_budget(budget)
        return None
