"""LoHa layers: the weight delta is the Hadamard (element-wise) product of two rank-r products.

Linear, and Conv2d flattened to (out, in * kh * kw): ``delta = (w1_a @ w1_b) * (w2_a @ w2_b)``, with w*_a (out, r)
and w*_b (r, in). Conv2d with `use_effective_conv2d` (kernel > 1x1): each factor is a CP form
``einsum(t (r, r, kh, kw), w_a (r, out), w_b (r, in))`` and ``delta = factor1 * factor2``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from oxpeft.tuners.lycoris import LycorisConfig, LycorisLayer, kaiming_init, rebuild_cp


class LoHaLayer(LycorisLayer):
    """LoHa on nn.Linear or nn.Conv2d."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def _create_factors(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        if self._uses_cp(config):
            base = self.get_base_layer()
            kh, kw = base.kernel_size
            in_channels = base.in_channels // base.groups
            cores = [self._param(t, (r, r, kh, kw), adapter_name) for t in ("hada_t1", "hada_t2")]
            shapes = {"_a": (r, self.out_features), "_b": (r, in_channels)}
        else:
            cores = []
            out_dim, in_dim = self._flat_weight_shape()
            shapes = {"_a": (out_dim, r), "_b": (r, in_dim)}
        w1_a, w1_b, w2_a, w2_b = (
            self._param(f"hada_{w}{side}", shapes[side], adapter_name) for w in ("w1", "w2") for side in ("_a", "_b")
        )
        with torch.no_grad():
            for p in (w1_a, w1_b, w2_a, *cores):
                kaiming_init(p)
            if config.init_weights:
                nn.init.zeros_(w2_b)  # one zero factor makes the whole product zero
            else:
                kaiming_init(w2_b)

    def _full_delta(self, adapter_name: str) -> torch.Tensor:
        factors = [
            getattr(self, attr)[adapter_name]
            for attr in self.adapter_layer_names
            if adapter_name in getattr(self, attr)
        ]
        if torch.is_grad_enabled() and any(f.requires_grad for f in factors):
            # Autograd would keep both full-size products (2 x out x in) until backward; recomputing them there
            # from the small factors costs two rank-r matmuls.
            return checkpoint(_hadamard_delta, *factors, use_reentrant=False)
        return _hadamard_delta(*factors)

    def __repr__(self) -> str:
        return "loha." + super().__repr__()


def _hadamard_delta(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unscaled LoHa delta from its factors (in `LoHaLayer.adapter_layer_names` order)."""
    if t1 is not None and t2 is not None:
        return rebuild_cp(t1, w1_a, w1_b) * rebuild_cp(t2, w2_a, w2_b)
    return (w1_a @ w1_b) * (w2_a @ w2_b)
