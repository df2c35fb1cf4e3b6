"""`PeftWarning`: the category of the warnings oxpeft gives about adapters (filter it as HF PEFT's)."""

from __future__ import annotations

__all__ = ["PeftWarning"]


class PeftWarning(UserWarning):
    """A warning about an adapter, a config or a model that oxpeft adapts."""
