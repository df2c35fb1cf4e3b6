"""Optimizers built for adapter training (HF PEFT's `peft.optimizers`)."""

from oxpeft.optimizers.loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
