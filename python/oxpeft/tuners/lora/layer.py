"""LoRA layers: Linear (also GPT-2 Conv1D and quantised bases), Embedding and Conv1d / Conv2d / Conv3d, each
with DoRA.

Math (REFERENCE.md section 2): ``y = base(x) + B(A(dropout(x))) * scaling``; merging adds
``scaling * B @ A`` computed in fp32 and rounded to the weight's dtype once.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.quant.bnb import bnb_bits, dequantize_bnb
from oxpeft.tuners._buffer_dict import BufferDict
from oxpeft.tuners.lora.bdlora import factor_weight
from oxpeft.tuners.lora.kasa import apply_pending
from oxpeft.tuners.lora.monteclora import sampled_lora_a
from oxpeft.tuners.lora.velora import VeloraState
from oxpeft.tuners.lora.dora import DoraMagnitude, channel_norm, channel_view, dora_weight_norm
from oxpeft.tuners.tuners_utils import BaseTunerLayer, check_merged_weight, innermost_base


# The adapter name that, in a mixed batch, means "no adapter for this sample".
BASE_ONLY = "__base__"


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


class LoraLayer(BaseTunerLayer):
    adapter_layer_names = (
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_velora_embed",
        "lora_diag", "lora_monteclora_sampler",
    )  # fmt: skip
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "lora_bias")

    fan_in_fan_out: bool = False

    def _init_lora(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_velora_embed = BufferDict(persistent=True)  # VeLoRA's projection vectors (saved, as PEFT's)
        self._velora = VeloraState()
        self.lora_diag = nn.ParameterDict()  # KaSA's learnable singular values
        self._kasa_pending: set[str] = set()  # KaSA adapters whose base truncation waits for a real weight
        self.lora_monteclora_sampler = nn.ModuleDict()  # MonteCLoRA's variational state
        # ensure_weight_tying (tied.py): on the input embedding, its adapters that tied output layers share (and those
        # merged when such a layer merged); on an output layer, the embedding layer each tied adapter follows.
        self._tied_adapters: set[str] = set()
        self._merged_through_tie: set[str] = set()
        self._tied_sources: dict[str, nn.Module] = {}
        self._dora_norm_cache: dict[str, torch.Tensor] = {}
        # Per-sample adapter names while a mixed-batch forward runs (set by LoraModel.batch_adapters).
        self._batch_adapter_names: list[str] | None = None

    # --- adapter creation ----------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: Any,
        use_rslora: bool,
        use_dora: bool = False,
        lora_bias: bool = False,
        adapter_dtype: torch.dtype | None = None,
        ephemeral_gpu_offload: bool = False,
    ) -> None:
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_dora[adapter_name] = use_dora
        self.lora_bias[adapter_name] = lora_bias
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        try:
            self._create_adapter_weights(adapter_name, r, lora_bias)
        except (RuntimeError, MemoryError) as exc:
            if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
                raise
            gib = r * (self.in_features + self.out_features) * 4 / 2**30
            raise ValueError(
                f"adapter '{adapter_name}': r={r} needs about {gib:,.1f} GiB of adapter weights for a "
                f"{self.in_features} x {self.out_features} layer, which cannot be allocated; choose a smaller r"
            ) from None
        self._move_adapter_to_base(adapter_name, adapter_dtype)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        if use_dora:
            self._init_dora(adapter_name, ephemeral_gpu_offload)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Any) -> None:
        if init_lora_weights is False:
            return
        if init_lora_weights == "orthogonal":
            self._init_orthogonal(adapter_name)
            return
        if init_lora_weights == "mica":
            self._init_mica(adapter_name)
            return
        if adapter_name in self.lora_A:
            A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            if init_lora_weights == "gaussian":
                nn.init.normal_(A, std=1.0 / self.r[adapter_name])
            elif isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
                self._init_pissa(adapter_name, init_lora_weights)
                return
            elif init_lora_weights == "olora":
                self._init_olora(adapter_name)
                return
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
            if self.lora_B[adapter_name].bias is not None:
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    # PiSSA / OLoRA move the principal part of W into the adapter and subtract it from W, so the model's output
    # is unchanged at init. Only defined for dense Linear weights.
    def _principal_init_weight(self, method: str) -> torch.Tensor:
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear) and not self.fan_in_fan_out:
            raise ValueError(f"init_lora_weights='{method}' needs a full-precision Linear base layer")
        return _transpose(base.weight.detach(), self.fan_in_fan_out).float()

    def _set_principal(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        base = self.get_base_layer()
        scaling = self.scaling[adapter_name]
        self.lora_A[adapter_name].weight.data.copy_(a)
        self.lora_B[adapter_name].weight.data.copy_(b)
        residual = _transpose(base.weight.float(), self.fan_in_fan_out) - scaling * (b @ a)
        base.weight.data.copy_(_transpose(residual, self.fan_in_fan_out).to(base.weight.dtype))

    def _init_pissa(self, adapter_name: str, method: str) -> None:
        weight = self._principal_init_weight("pissa")
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if method == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            niter = int(method[len("pissa_niter_") :])
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
            vh = v.T
        root = torch.sqrt(s / scaling)
        self._set_principal(adapter_name, root[:, None] * vh, u * root[None, :])

    def _init_olora(self, adapter_name: str) -> None:
        weight = self._principal_init_weight("olora")
        r = self.r[adapter_name]
        q, rr = torch.linalg.qr(weight)
        self._set_principal(adapter_name, rr[:r].contiguous(), q[:, :r].contiguous())

    def _init_orthogonal(self, adapter_name: str) -> None:
        """A and B from the odd and even rows of one random orthogonal (r, r) matrix: both are non-zero, yet
        B @ A = 0, so the model's output is unchanged at init (https://datta0.github.io/posts/rethink-lora-init/)."""
        if adapter_name not in self.lora_A or not isinstance(self.lora_A[adapter_name], nn.Linear):
            raise ValueError(
                f"init_lora_weights='orthogonal' is defined for Linear layers only, not {type(self.get_base_layer()).__name__}"
            )
        r = self.r[adapter_name]
        if r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
        q, _ = torch.linalg.qr(torch.randn(r, r))
        a = (torch.randn(self.in_features, r // 2) @ q[0::2]).T / 10.0
        b = torch.randn(r // 2, self.out_features).T @ q[1::2] / 10.0
        self.lora_A[adapter_name].weight.data.copy_(a)
        self.lora_B[adapter_name].weight.data.copy_(b)
        if self.lora_B[adapter_name].bias is not None:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    def _init_mica(self, adapter_name: str) -> None:
        """MiCA (minor component adaptation): B holds the left singular vectors of the base weight's r smallest
        singular values and stays frozen, A starts at zero and is the only weight trained."""
        raise ValueError(
            f"init_lora_weights='mica' is defined for Linear and Embedding layers, not {type(self.get_base_layer()).__name__}"
        )

    def _mica_factors(self, weight: torch.Tensor, r: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(zero A, minor left singular vectors of `weight` as B) for a (out, in) `weight` in fp32."""
        if r > min(weight.shape):
            raise ValueError(
                f"init_lora_weights='mica' needs r <= min{tuple(weight.shape)} = {min(weight.shape)} for the {what} "
                f"of shape {tuple(weight.shape)}, got r={r}"
            )
        u, _, _ = torch.linalg.svd(weight, full_matrices=False)
        return torch.zeros(r, weight.shape[1], device=weight.device), u[:, -r:].contiguous()

    # --- LoftQ ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def loftq_init(self, adapter_name: str, loftq_config: dict) -> None:
        """Quantise the base layer and initialise the adapter so that deq(Q) + scaling * B @ A ~ W (LoftQ).

        The base becomes oxpeft's Linear4bit (NF4, no double quantisation, so it holds exactly the weight the
        loop optimised for) or Linear8bit; the adapter is fitted to the quantisation residual by the Rust loop.
        """
        from oxpeft.loftq import LoftQConfig, loftq_initialize
        from oxpeft.quant import Linear4bit, Linear8bit

        base = self.base_layer
        if type(base) is not nn.Linear:
            raise ValueError(f"init_lora_weights='loftq' needs a full-precision nn.Linear base, got {type(base).__name__}")
        config = LoftQConfig.from_dict(loftq_config or {})
        dequantized, lora_a, lora_b = loftq_initialize(
            base.weight, self.r[adapter_name], self.scaling[adapter_name], config
        )
        fitted = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        fitted.weight = nn.Parameter(dequantized, requires_grad=False)
        if base.bias is not None:
            fitted.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        if config.loftq_bits == 4:
            self.base_layer = Linear4bit.from_linear(fitted, quant_type="nf4", compress_statistics=False)
        else:
            self.base_layer = Linear8bit.from_linear(fitted)
        self.lora_A[adapter_name].weight.copy_(lora_a)
        self.lora_B[adapter_name].weight.copy_(lora_b)

    # --- DoRA ----------------------------------------------------------------------------------------------------
    def _dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor, dequantised if the base is quantised."""
        base = self.get_base_layer()
        if bnb_bits(base):
            return dequantize_bnb(base)
        if hasattr(base, "dequantize"):
            return base.dequantize()
        return _transpose(base.weight, self.fan_in_fan_out)

    def _dora_weight_norm(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return dora_weight_norm(
            weight, self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, self.scaling[adapter_name]
        )

    # The stored weight's dimension that DoRA's magnitude runs along (Linear: rows, or columns when the weight is
    # stored (in, out); Embedding: columns; convolutions: output channels).
    _dora_channel_dim = 0

    def _dora_magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def _dora_reference(self, adapter_name: str) -> tuple[torch.Tensor, int]:
        """W + scaling * delta in fp32 and the dimension of its channels: what DoRA's norm is taken of."""
        return self._stored_weight().float() + self.get_delta_weight(adapter_name), self._dora_channel_dim

    @torch.no_grad()
    def _init_dora(self, adapter_name: str, ephemeral_gpu_offload: bool = False) -> None:
        ref = next(iter(self.adapter_parameters(adapter_name)))
        if ref.device.type == "meta":  # created for a state dict to be assigned: nothing to compute
            magnitude = DoraMagnitude(self._dora_magnitude_shape())
            magnitude.to(device="meta", dtype=ref.dtype)
            self.lora_magnitude_vector[adapter_name] = magnitude
            return
        if ephemeral_gpu_offload and ref.device.type == "cpu" and torch.cuda.is_available():
            # LoraRuntimeConfig.ephemeral_gpu_offload: the same norm, computed on the GPU and brought back.
            moved = [(p, p.data) for p in (*self.get_base_layer().parameters(), *self.adapter_parameters(adapter_name))]
            try:
                for p, data in moved:
                    p.data = data.to("cuda")
                norm = channel_norm(*self._dora_reference(adapter_name)).cpu()
            finally:
                for p, data in moved:
                    p.data = data
        else:
            norm = channel_norm(*self._dora_reference(adapter_name))
        magnitude = DoraMagnitude(self._dora_magnitude_shape())
        magnitude.weight.data = norm.reshape(self._dora_magnitude_shape()).to(device=ref.device, dtype=ref.dtype)
        self.lora_magnitude_vector[adapter_name] = magnitude

    def _dora_factor(self, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        """m / norm as a per-channel fp32 vector."""
        return self.lora_magnitude_vector[adapter_name].weight.float().reshape(-1) / norm

    # --- merge ---------------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's layout."""
        raise TypeError(f"{type(self).__name__} has no delta weight")

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight after merging one adapter into `weight` (in the base weight's layout).

        DoRA's norm is that of the base weight without any merged adapter plus this adapter's delta, as in the
        forward pass: the merged model then computes what the unmerged one with the same adapters active does.
        """
        delta = self.get_delta_weight(adapter_name)
        merged = weight.float() + delta
        if self.use_dora.get(adapter_name, False):
            dim = self._dora_channel_dim
            pristine = merged if not self.merged_adapters else self._pristine_weight(weight) + delta
            norm = channel_norm(pristine, dim)
            self._dora_norm_cache[adapter_name] = norm
            merged = merged * channel_view(self._dora_factor(adapter_name, norm), merged.dim(), dim)
        return merged

    def _pristine_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (the stored weight) with the merged adapters undone, in fp32; the caches are kept."""
        current = weight.float()
        for name in reversed(self.merged_adapters):
            if self.use_dora.get(name, False):
                factor = self._dora_factor(name, self._dora_norm_cache[name])
                current = current / channel_view(factor, current.dim(), self._dora_channel_dim)
            current = current - self.get_delta_weight(name)
        return current

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        current = weight.float()
        if self.use_dora.get(adapter_name, False):
            factor = self._dora_factor(adapter_name, self._dora_norm_cache.pop(adapter_name))
            current = current / channel_view(factor, current.dim(), self._dora_channel_dim)
        return current - self.get_delta_weight(adapter_name)

    def _bias_delta(self, adapter_name: str) -> torch.Tensor | None:
        if not self.lora_bias.get(adapter_name, False):
            return None
        return self.lora_B[adapter_name].bias.float() * self.scaling[adapter_name]

    @property
    def keeps_tying(self) -> bool:  # type: ignore[override]
        """Whether every adapter here is tied to / by a tied output layer (merging then keeps the tie)."""
        names = self.adapter_names()
        return bool(names) and all(n in self._tied_adapters or n in self._tied_sources for n in names)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self._merged_through_tie:  # merged already, when a tied output layer merged
            requested = self.active_adapters if adapter_names is None else list(adapter_names)
            adapter_names = [n for n in requested if n not in self._merged_through_tie]
            self._merged_through_tie.clear()
            if not adapter_names:
                return
        base = self.get_base_layer()
        names = self._adapters_to_merge(adapter_names)
        if self._kasa_pending:
            apply_pending(self, names)
        for name in names:
            if name in self._tied_sources:
                # The shared weight takes the delta once, through the embedding's layer.
                source = self._tied_sources[name]
                if name not in source.merged_adapters:
                    source.merge(safe_merge=safe_merge, adapter_names=[name])
                    source._merged_through_tie.add(name)
                self.merged_adapters.append(name)
                continue
            merged = self._merged_weight(name, self._stored_weight())
            if safe_merge:
                check_merged_weight(merged, name)
            self._store_weight(merged)
            bias_delta = self._bias_delta(name)
            if bias_delta is not None:
                if base.bias is None:
                    raise ValueError(f"adapter '{name}' has a LoRA bias but the base layer has no bias to merge into")
                base.bias.data = (base.bias.float() + bias_delta).to(base.bias.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        self._merged_through_tie.clear()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._tied_sources:
                if name in self._tied_sources[name].merged_adapters:
                    self._tied_sources[name].unmerge()
                continue
            self._store_weight(self._unmerged_weight(name, self._stored_weight()))
            bias_delta = self._bias_delta(name)
            if bias_delta is not None:
                base.bias.data = (base.bias.float() - bias_delta).to(base.bias.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._velora.remove(adapter_name)
        self._kasa_pending.discard(adapter_name)
        self._tied_adapters.discard(adapter_name)
        self._tied_sources.pop(adapter_name, None)

    def _check_forward_args(self, x: torch.Tensor) -> None:
        if self._kasa_pending:
            apply_pending(self, self._active_adapter)
        if self.merged and self.disable_adapters:
            self.unmerge()
        if self._batch_adapter_names is not None and self.merged:
            raise ValueError("per-sample adapter_names cannot be used while adapters are merged; unmerge first")

    def _sample_groups(self, batch_size: int) -> dict[str, torch.Tensor]:
        """adapter name -> indices of the samples that use it (generate() may repeat each sample k times)."""
        names = self._batch_adapter_names or []
        if batch_size % len(names):
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch_size}")
        repeat = batch_size // len(names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
        return {n: torch.tensor(idx) for n, idx in groups.items() if n != BASE_ONLY}

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, delta) -> torch.Tensor:
        result = result.clone()
        for name, idx in self._sample_groups(x.shape[0]).items():
            if name not in self.adapter_names():
                continue
            idx = idx.to(x.device)
            result[idx] = result[idx] + delta(name, x[idx]).to(result.dtype)
        return result


class Linear(nn.Module, LoraLayer):
    """LoRA on nn.Linear, transformers' Conv1D (`fan_in_fan_out=True`) and quantised Linear layers."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init_lora_weights: Any = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        adapter_dtype: torch.dtype | None = None,
        ephemeral_gpu_offload: bool = False,
    ) -> None:
        super().__init__()
        in_features, out_features = _linear_shape(innermost_base(base_layer))
        self._init_lora(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora, lora_bias, adapter_dtype,
            ephemeral_gpu_offload,
        )
        self.set_adapter(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        b = factor_weight(self.lora_B[adapter_name]).float()
        a = factor_weight(self.lora_A[adapter_name]).float()
        if adapter_name in self.lora_diag:  # KaSA: B @ diag @ A
            b = b * self.lora_diag[adapter_name].float()
        return _transpose(b @ a, self.fan_in_fan_out) * self.scaling[adapter_name]

    @property
    def _dora_channel_dim(self) -> int:  # type: ignore[override]
        return 1 if self.fan_in_fan_out else 0

    def _init_mica(self, adapter_name: str) -> None:
        self.freeze_adapter_weight(adapter_name, "lora_B")
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if a.device.type == "meta":  # created for a state dict to be loaded
            return
        zero, minor = self._mica_factors(self._dense_base_weight().float(), self.r[adapter_name], "weight")
        a.data.copy_(zero)
        b.data.copy_(minor)

    def _dora_reference(self, adapter_name: str) -> tuple[torch.Tensor, int]:
        a, b = self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float()
        return self._dense_base_weight().float() + self.scaling[adapter_name] * (b @ a), 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if self._batch_adapter_names is not None:
            return self._mixed_batch_forward(x, result, self._lora_delta)
        result_dtype = result.dtype
        for name in self._active_adapter:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout, scaling = self.lora_dropout[name], self.scaling[name]
            x_ = self._cast_input_dtype(x, lora_A.weight.dtype)
            if self.use_dora[name]:
                result = result + self._dora_forward(x_, result, name, dropout, scaling)
                continue
            if name in self.lora_velora_embed:
                after_a = self._velora.after_a(self, name, dropout(x_))
            elif self.training and name in self.lora_monteclora_sampler:
                after_a = F.linear(dropout(x_), sampled_lora_a(self, name))
            else:
                after_a = lora_A(dropout(x_))
            if name in self.lora_diag:
                after_a = after_a * self.lora_diag[name]
            if lora_B.bias is None and result.dtype == lora_B.weight.dtype and type(lora_B) is nn.Linear:
                # Scale the rank-r activations, not the full output, and fuse the add into the GEMM:
                # two fewer passes over the (tokens x out_features) result than B(A(x)) * s + y.
                after_a = after_a * scaling
                flat = torch.addmm(result.reshape(-1, result.shape[-1]), after_a.reshape(-1, after_a.shape[-1]), lora_B.weight.t())
                result = flat.view(result.shape)
            else:
                result = result + lora_B(after_a) * scaling
        return result.to(result_dtype)

    def _lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.use_dora[name]:
            raise ValueError("per-sample adapter_names is not supported for DoRA adapters")
        lora_A = self.lora_A[name]
        after_a = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))
        if name in self.lora_diag:
            after_a = after_a * self.lora_diag[name]
        return self.lora_B[name](after_a) * self.scaling[name]

    def _dora_forward(
        self, x: torch.Tensor, base_result: torch.Tensor, name: str, dropout: nn.Module, scaling: float
    ) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        weight = self._dense_base_weight().to(x.dtype)
        # The norm is detached, as in the DoRA paper (section 4.3): it saves memory and barely changes training.
        norm = self._dora_weight_norm(name, weight).detach().to(x.dtype)
        factor = (self.lora_magnitude_vector[name].weight / norm).view(1, -1)
        x_d = dropout(x)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.bias
            base_out = base_result.to(x.dtype) if bias is None else base_result.to(x.dtype) - bias.to(x.dtype)
        else:
            base_out = F.linear(x_d, weight)
        return (factor - 1) * base_out + factor * lora_B(lora_A(x_d)) * scaling

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Embedding(nn.Module, LoraLayer):
    """LoRA on nn.Embedding: A (r, num_embeddings) is looked up, then projected by B (dim, r).

    DoRA: the magnitude has one entry per embedding dimension (a column of the (num, dim) table), and the adapted
    output is ``m / ||W + s * delta||_col * (base(x) + s * B(A[x]))``.
    """

    _dora_channel_dim = 1

    def __init__(
        self,
        base_layer: nn.Embedding,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: Any = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        adapter_dtype: torch.dtype | None = None,
        ephemeral_gpu_offload: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        if lora_bias:
            raise ValueError("lora_bias is not supported on nn.Embedding")
        inner = innermost_base(base_layer)
        self._init_lora(base_layer, inner.num_embeddings, inner.embedding_dim)
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora, False, adapter_dtype,
            ephemeral_gpu_offload,
        )
        self.set_adapter(adapter_name)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        # Random until reset_lora_parameters runs, so init_lora_weights=False gives a non-trivial adapter.
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        b = self.lora_embedding_B[adapter_name].float()
        a = self.lora_embedding_A[adapter_name].float()
        return (b @ a).T * self.scaling[adapter_name]

    def _init_mica(self, adapter_name: str) -> None:
        # The projection the adapter adds to is the table transposed, (dim, num_embeddings).
        self.freeze_adapter_weight(adapter_name, "lora_embedding_B")
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        if a.device.type == "meta":
            return
        table = self.get_base_layer().weight.detach().float().T
        zero, minor = self._mica_factors(table, self.r[adapter_name], "embedding table (transposed)")
        a.data.copy_(zero)
        b.data.copy_(minor)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if self._batch_adapter_names is not None:
            return self._mixed_batch_forward(x, result, self._lora_delta)
        result_dtype = result.dtype
        for name in self._active_adapter:
            if name not in self.lora_embedding_A:
                continue
            if self.use_dora[name]:
                weight = self.get_base_layer().weight
                reference, dim = self._dora_reference(name)
                norm = channel_norm(reference.detach(), dim)
                factor = self.lora_magnitude_vector[name].weight / norm.to(weight.dtype)
                result = factor * result + factor * self._lora_delta(name, x)
            else:
                result = result + self._lora_delta(name, x)
        return result.to(result_dtype)

    def _lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self._batch_adapter_names is not None and self.use_dora[name]:
            raise ValueError("per-sample adapter_names is not supported for DoRA adapters")
        base = self.get_base_layer()
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        after_a = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (after_a @ b.T) * self.scaling[name]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class _ConvNd(nn.Module, LoraLayer):
    """LoRA on a convolution: A is a conv with the base's kernel, stride, padding and dilation; B a 1x..x1 conv
    with the base's groups. Grouped convolutions (rank divisible by groups) train and run; their delta is not a
    grouped kernel, so they cannot be merged.

    DoRA: the magnitude (1, out, 1, ...) scales output channels; the norm is over each output channel's kernel.
    """

    _conv_dims: int = 2

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: Any = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        adapter_dtype: torch.dtype | None = None,
        ephemeral_gpu_offload: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        inner = innermost_base(base_layer)
        if inner.weight.dim() != self._conv_dims + 2:
            raise ValueError(f"{type(self).__name__} needs a {self._conv_dims + 2}-D kernel, got {inner.weight.dim()}-D")
        if inner.groups > 1:
            warnings.warn(
                f"LoRA on a {type(inner).__name__} with groups={inner.groups}: it trains and runs, but cannot be "
                "merged into the base weight",
                stacklevel=4,
            )
        self._init_lora(base_layer, inner.in_channels, inner.out_channels)
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora, lora_bias, adapter_dtype,
            ephemeral_gpu_offload,
        )
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, *args: Any, **kwargs: Any) -> None:
        groups = self.get_base_layer().groups
        if r % groups:
            raise ValueError(
                f"LoRA on a {type(self.get_base_layer()).__name__} with groups={groups} needs a rank divisible by the "
                f"groups, got r={r} for adapter '{adapter_name}'; choose another rank or do not target this layer"
            )
        super().update_layer(adapter_name, r, *args, **kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        conv = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else _CONV_BY_DIMS[self._conv_dims]
        ones = (1,) * self._conv_dims
        self.lora_A[adapter_name] = conv(
            self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
        )
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def _dora_magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * self._conv_dims

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A as a kernel (out, in, *k): A's kernel summed into each output channel by B."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        if self.get_base_layer().groups > 1:
            raise ValueError(
                f"adapter '{adapter_name}' on a grouped convolution (groups={self.get_base_layer().groups}) has no "
                "kernel-shaped delta: LoRA on grouped convolutions cannot be merged"
            )
        r = a.shape[0]
        delta = (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(self.out_features, *a.shape[1:])
        return delta * self.scaling[adapter_name]

    def _dora_reference(self, adapter_name: str) -> tuple[torch.Tensor, int]:
        return self._stored_weight().float() + self._dora_delta(adapter_name), 0

    def _dora_delta(self, adapter_name: str) -> torch.Tensor:
        """The delta DoRA's norm adds: B reshaped to (-1, r) times A reshaped to (r, -1), in the kernel's shape.
        For groups=1 it is the merge delta; for grouped convolutions it is PEFT's definition, kept so that
        adapters trained there give the same outputs here."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        r = a.shape[0]
        weight = self.get_base_layer().weight
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(weight.shape) * self.scaling[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        groups = self.get_base_layer().groups
        if groups > 1 and self._adapters_to_merge(adapter_names):
            raise ValueError(
                f"LoRA on a grouped convolution (groups={groups}) cannot be merged: the adapter's delta is not a "
                "grouped kernel. Keep the adapter unmerged."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        result_dtype = result.dtype
        for name in self._active_adapter:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout, scaling = self.lora_dropout[name], self.scaling[name]
            x_ = self._cast_input_dtype(x, lora_A.weight.dtype)
            if self.use_dora[name]:
                result = result + self._dora_forward(x_, result, name, dropout, scaling)
            else:
                result = result + lora_B(lora_A(dropout(x_))) * scaling
        return result.to(result_dtype)

    def _dora_forward(
        self, x: torch.Tensor, base_result: torch.Tensor, name: str, dropout: nn.Module, scaling: float
    ) -> torch.Tensor:
        base = self.get_base_layer()
        reference, dim = self._dora_reference(name)
        norm = channel_norm(reference.detach(), dim).to(x.dtype)
        magnitude = self.lora_magnitude_vector[name].weight
        factor = magnitude / norm.reshape(magnitude.shape)
        x_d = dropout(x)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_out = base_result.to(x.dtype)
            if base.bias is not None:
                base_out = base_out - base.bias.to(x.dtype).reshape((1, -1) + (1,) * self._conv_dims)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self._conv_dims - 1]
            base_out = conv(x_d, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
        return (factor - 1) * base_out + factor * self.lora_B[name](self.lora_A[name](x_d)) * scaling

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Conv1d(_ConvNd):
    """LoRA on nn.Conv1d."""

    _conv_dims = 1


class Conv2d(_ConvNd):
    """LoRA on nn.Conv2d."""

    _conv_dims = 2


class Conv3d(_ConvNd):
    """LoRA on nn.Conv3d."""

    _conv_dims = 3


_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _linear_shape(base_layer: nn.Module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
        return base_layer.in_features, base_layer.out_features
    raise ValueError(f"cannot apply LoRA to {type(base_layer).__name__}: it has no in_features/out_features")


def warn_fan_in_fan_out(key: str, required: bool, configured: bool) -> None:
    if required != configured:
        warnings.warn(
            f"'{key}': fan_in_fan_out={configured} does not fit its layer type; using fan_in_fan_out={required}",
            stacklevel=4,
        )
