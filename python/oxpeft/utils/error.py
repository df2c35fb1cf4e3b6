"""oxpeft's exceptions with HF PEFT's names (`peft.utils.error`)."""

from __future__ import annotations

__all__ = ["NoMatchingPeftModuleError", "PeftError"]


class PeftError(Exception):
    """Base of the errors that are about adapters rather than about the arguments' types."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """An adapter's `target_modules` (an entry of the list, or the regex) match no module of the model.

    A ValueError too, as PEFT's is, so code that catches ValueError keeps working.
    """
