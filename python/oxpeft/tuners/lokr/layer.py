"""LoKr layers: the weight delta is a Kronecker product ``kron(w1, w2)``.

With out = a * b and in = c * d (`factorization`), w1 is (a, c) and w2 is (b, d) (convolutions: (b, d, *kernel), or
(b, d * kernel size) in flattened form). Either factor may be stored as a rank-r product (`lokr_w1_a @ lokr_w1_b`,
`lokr_w2_a @ lokr_w2_b`), and a k x k conv's w2 in CP form (`lokr_t2`, `lokr_w2_a`, `lokr_w2_b`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oxpeft.tuners.lycoris_utils import LycorisConfig, LycorisLayer, kaiming_init, rebuild_cp


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n) with m * n == dimension, as LyCORIS and HF PEFT do.

    A positive `factor` that divides the dimension gives (factor, dimension // factor) as is. Otherwise divisors are
    tried in increasing order, up to `factor` (-1: no limit), while the first stays below the second; the
    result is ordered so that m <= n. Examples: 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    candidate = 2
    while m < n:
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
        candidate += 1
    return (m, n) if m <= n else (n, m)


class LoKrLayer(LycorisLayer):
    """LoKr on nn.Linear, nn.Conv1d or nn.Conv2d."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def _create_factors(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        base = self.get_base_layer()
        in_dim = self.in_features // base.groups if self.is_conv else self.in_features
        a, b = factorization(self.out_features, config.decompose_factor)
        c, d = factorization(in_dim, config.decompose_factor)
        kernel = tuple(base.kernel_size) if self.is_conv else ()
        kernel_numel = math.prod(kernel)

        # A factor is stored as a rank-r product only when that is smaller than the factor itself.
        w1_full = not (config.decompose_both and r < max(a, c) / 2)
        w2_full = not (r < max(b, d) / 2)
        with torch.no_grad():
            if w1_full:
                w1 = [self._param("lokr_w1", (a, c), adapter_name)]
            else:
                w1 = [self._param("lokr_w1_a", (a, r), adapter_name), self._param("lokr_w1_b", (r, c), adapter_name)]
            if w2_full:
                w2 = [self._param("lokr_w2", (b, d, *kernel), adapter_name)]
            elif self._uses_cp(config):
                w2 = [
                    self._param("lokr_w2_a", (r, b), adapter_name),
                    self._param("lokr_w2_b", (r, d), adapter_name),
                    self._param("lokr_t2", (r, r, *self._cp_kernel()), adapter_name),
                ]
            else:
                w2 = [
                    self._param("lokr_w2_a", (b, r), adapter_name),
                    self._param("lokr_w2_b", (r, d * kernel_numel), adapter_name),
                ]
            for p in w1 + w2:
                kaiming_init(p)
            # A zero factor makes the Kronecker product zero, so the adapter starts as the identity.
            if config.init_weights is True:
                nn.init.zeros_(w1[0])  # lokr_w1, or lokr_w1_a
            elif config.init_weights == "lycoris":
                nn.init.zeros_(w2[0] if w2_full else self.lokr_w2_b[adapter_name])

    def _full_delta(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            w1 = self.lokr_w1[adapter_name]
        else:
            w1 = self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
        if adapter_name in self.lokr_w2:
            w2 = self.lokr_w2[adapter_name]
        elif adapter_name in self.lokr_t2:
            w2 = rebuild_cp(self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        else:
            w2 = self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
        if w2.dim() == 4:
            # kron(w1[:, :, None, None], w2) written out: torch.kron fails on a CP-form Conv1d w2 (b, d, k, 1).
            (a, c), (b, d, kh, kw) = w1.shape, w2.shape
            return (w1[:, None, :, None, None, None] * w2[None, :, None, :, :, :]).reshape(a * b, c * d, kh, kw)
        # A full Conv1d w2 is 3-D and kron pads w1 with a leading axis; the result is reshaped to the kernel as is,
        # exactly as HF PEFT computes it, so that adapters mean the same in both libraries.
        return torch.kron(w1, w2)

    def __repr__(self) -> str:
        return "lokr." + super().__repr__()
