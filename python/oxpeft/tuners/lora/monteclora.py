"""MonteCLoRA (`LoraConfig(monteclora_config=MontecloraConfig(...))`, Monte Carlo LoRA): in training, lora_A is
replaced by a learnt mixture of `num_samples` noisy copies of itself; in evaluation, merged or saved it is plain LoRA.

Each training forward of an adapted nn.Linear draws, per layer:

- a diagonal covariance ``C = diag(max(diag(S W S), 1e-3))`` over lora_A's r output features, with
  ``S = diag(exp(std_prior))`` and W a Wishart(df=r, I) sample (only its diagonal is drawn);
- `num_samples` noise matrices ``sample_scaler * Z @ chol(C)`` of lora_A's transposed shape (in, r), Z standard
  normal;
- mixture weights ``softmax(L @ z + mu)``, a normal approximation in log space of a Dirichlet with concentration
  ``exp(expert_weights_prior)`` (L the Cholesky factor of its covariance, mu the centred log concentration);

and lora_A's weight is the weighted mean of the noisy copies. `std_prior` and `expert_weights_prior` are learnt; the
last covariance and mixture weights are kept as the buffers `gaussian_var_prior` and `expert_weights`. All four are
saved under PEFT's keys (`<layer>.lora_monteclora_sampler.<name>`). `LoraModel._get_monteclora_loss()` gives the
variational loss (KL terms weighted by `kl_loss_weight`, plus the mixture weights' squared norm with `use_entropy`),
averaged over the adapted layers, in training mode (0.0 otherwise); `oxpeft.helpers.MontecloraTrainerMixin` adds it
to a Trainer's loss.

PEFT pre-draws `buffer_size` sets of noise per layer (num_samples x in x r floats each, hundreds of MB per layer of a
7B model at its default of 150); oxpeft draws each step's noise when the step runs, from the same distributions, and
accepts `buffer_size` for compatibility only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_EPS = 1e-3


@dataclass
class MontecloraConfig:
    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError("`num_samples` must be greater than 0.")
        if self.dirichlet_prior <= 0:
            raise ValueError("`dirichlet_prior` must be greater than 0.")
        if self.buffer_size <= 0:
            raise ValueError("`buffer_size` must be greater than 0.")


def _spd_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor, computed in fp32 (half precision makes it fail), in the matrix's dtype."""
    return torch.linalg.cholesky(matrix.float()).to(matrix.dtype)


class MontecloraSampler(nn.Module):
    """The variational state of one adapter of one layer (lora_A of shape (rank, in_features))."""

    def __init__(self, in_features: int, rank: int, config: MontecloraConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.rank, self.config = in_features, rank, config
        k = config.num_samples
        self.std_prior = nn.Parameter(torch.empty(rank, device=device, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(torch.empty(k, device=device, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, device=device, dtype=dtype))
        self.register_buffer("expert_weights", torch.full((k,), 1.0 / k, device=device, dtype=dtype))
        if self.std_prior.device.type != "meta":
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh variational parameters (uniform in [0, 1)) and the neutral buffers."""
        self.std_prior.uniform_()
        self.expert_weights_prior.uniform_()
        self.gaussian_var_prior = torch.eye(self.rank, device=self.std_prior.device, dtype=self.std_prior.dtype)
        k = self.config.num_samples
        self.expert_weights = torch.full((k,), 1.0 / k, device=self.std_prior.device, dtype=self.std_prior.dtype)

    def _dirichlet_logits(self, concentration: torch.Tensor) -> torch.Tensor:
        k = self.config.num_samples
        alpha = concentration.clamp_min(1e-6)
        centred = alpha.log() - alpha.log().mean()
        variance = (1 / alpha * (1 - 2 / k) + (1 / alpha).sum() / k**2).clamp_min(1e-6)
        covariance = torch.diag(variance) + 1e-6 * torch.eye(k, device=alpha.device, dtype=alpha.dtype)
        try:
            factor = _spd_cholesky(covariance)
        except torch.linalg.LinAlgError:
            factor = _spd_cholesky(covariance + 1e-4 * torch.eye(k, device=alpha.device, dtype=alpha.dtype))
        return factor @ torch.randn(k, device=alpha.device, dtype=alpha.dtype) + centred

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise of shape (num_samples, in, rank), mixture weights (num_samples,)) for one training step."""
        device, dtype = self.std_prior.device, self.std_prior.dtype
        std = self.std_prior.exp()
        # Only W's diagonal is used: by Bartlett's decomposition W = T T^T with T lower triangular, T_ii^2 ~
        # chi2(r - i) and N(0, 1) below the diagonal, so W_ii is chi2(r - i) plus i squared normals (in fp32).
        r = self.rank
        chi2 = torch.distributions.Chi2(torch.arange(r, 0, -1, device=device, dtype=torch.float32)).sample()
        wishart_diag = (chi2 + torch.randn(r, r, device=device).tril(-1).square().sum(1)).to(dtype)
        # diag(S W S) for S diagonal: std_i^2 W_ii.
        covariance = torch.diag((std * std * wishart_diag).clamp_min(_EPS))
        self.gaussian_var_prior = covariance
        z = torch.randn(self.config.num_samples, self.in_features, self.rank, device=device, dtype=dtype)
        noise = torch.nan_to_num(z @ _spd_cholesky(covariance), nan=_EPS) * self.config.sample_scaler
        weights = torch.softmax(self._dirichlet_logits(self.expert_weights_prior.exp()), dim=-1)
        self.expert_weights = weights
        return noise, weights

    def variational_loss(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(kl_loss_weight * (Dirichlet + Wishart + Gaussian KL terms), entropy term) in training, else (0, 0).

        The terms are PEFT's: the Dirichlet term adds the log-gamma differences of the concentrations where the
        textbook KL subtracts them; here they are differences of `lgamma`, finite where PEFT's ratio of gammas
        overflows (concentrations summing past ~35)."""
        if not self.training:
            return 0.0, 0.0
        k, r = self.config.num_samples, self.rank
        alpha = self.expert_weights_prior.exp()
        prior = torch.full((k,), self.config.dirichlet_prior, device=alpha.device, dtype=alpha.dtype)
        dirichlet = (
            torch.lgamma(alpha.sum()) - torch.lgamma(prior.sum())
            + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
            + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum()
        )
        variance = (2 * self.std_prior).exp()  # diag(S S^T)
        wishart = 0.5 * (-variance.log().sum() * r + variance.sum() * r - r * r)
        var = self.gaussian_var_prior.diagonal().clamp_min(1e-6)
        gaussian = k * 0.5 * (var.sum() - var.log().sum() - r)
        entropy = (self.expert_weights**2).sum() if self.config.use_entropy else 0.0
        return self.config.kl_loss_weight * (dirichlet + wishart + gaussian), entropy


def add_monteclora(layer: nn.Module, adapter_name: str, config: MontecloraConfig, key: str) -> None:
    """Give the new adapter `adapter_name` of `layer` (LoRA on an nn.Linear) its sampler."""
    if type(layer).__name__ != "Linear":
        raise ValueError(f"MonteCLoRA applies to LoRA on Linear layers; '{key}' is a {type(layer).__name__}")
    a = layer.lora_A[adapter_name].weight
    layer.lora_monteclora_sampler[adapter_name] = MontecloraSampler(
        layer.in_features, a.shape[0], config, device=a.device, dtype=a.dtype
    )


def sampled_lora_a(layer: nn.Module, adapter_name: str) -> torch.Tensor:
    """lora_A's weight for one training step: the mixture of its noisy copies."""
    sampler = layer.lora_monteclora_sampler[adapter_name]
    weight = layer.lora_A[adapter_name].weight
    if sampler.std_prior.device.type == "meta":  # created for a file that did not hold it
        layer.lora_monteclora_sampler[adapter_name] = sampler = MontecloraSampler(
            sampler.in_features, sampler.rank, sampler.config, device=weight.device, dtype=weight.dtype
        )
    noise, weights = sampler()
    if torch.isnan(noise).any() or torch.isnan(weights).any():
        warnings.warn(f"MonteCLoRA sampling of adapter '{adapter_name}' gave NaNs; this step uses lora_A as it is")
        return weight
    return torch.einsum("n,nir->ri", weights, weight.T.unsqueeze(0) + noise)
