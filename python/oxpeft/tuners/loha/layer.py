"""LoHa layers: the weight delta is the Hadamard (element-wise) product of two rank-r products.

Linear, and Conv1d / Conv2d flattened to (out, in * kernel): ``delta = (w1_a @ w1_b) * (w2_a @ w2_b)``, with
w*_a (out, r) and w*_b (r, in). Convolutions with `use_effective_conv2d` (kernel > 1): each factor is a CP form
``einsum(t (r, r, kh, kw), w_a (r, out), w_b (r, in))`` and ``delta = factor1 * factor2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from oxpeft.tuners.lycoris_utils import LycorisConfig, LycorisLayer, kaiming_init, rebuild_cp


class LoHaLayer(LycorisLayer):
    """LoHa on nn.Linear, nn.Conv1d or nn.Conv2d."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def _create_factors(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        if self._uses_cp(config):
            base = self.get_base_layer()
            in_channels = base.in_channels // base.groups
            cores = [self._param(t, (r, r, *self._cp_kernel()), adapter_name) for t in ("hada_t1", "hada_t2")]
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
        w1_a, w1_b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2_a, w2_b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if adapter_name in self.hada_t1:
            t1, t2 = self.hada_t1[adapter_name], self.hada_t2[adapter_name]
            return rebuild_cp(t1, w1_a, w1_b) * rebuild_cp(t2, w2_a, w2_b)
        return HadamardProduct.apply(w1_a, w1_b, w2_a, w2_b)

    def __repr__(self) -> str:
        return "loha." + super().__repr__()


class HadamardProduct(torch.autograd.Function):
    """``(w1_a @ w1_b) * (w2_a @ w2_b)`` that keeps only the four small factors for backward.

    Plain autograd would keep both full-size products (2 x out x in per layer) alive until backward; here backward
    recomputes them from the factors, two rank-r matmuls.
    """

    @staticmethod
    def forward(
        ctx: Any, w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        return (w1_a @ w1_b) * (w2_a @ w2_b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad_1 = grad * (w2_a @ w2_b)  # gradient with respect to w1_a @ w1_b
        grad_2 = grad * (w1_a @ w1_b)
        return grad_1 @ w1_b.T, w1_a.T @ grad_1, grad_2 @ w2_b.T, w2_a.T @ grad_2
