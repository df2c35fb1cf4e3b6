"""Whether the training libraries in this process will recognise oxpeft's objects.

TRL, transformers' Trainer and accelerate find PEFT models, configs and layers through `import peft` (their
`isinstance` checks name `peft.PeftModel`, ...). Unless `peft` is oxpeft's alias (`oxpeft alias install`), they
treat an oxpeft model as a plain module (saving full checkpoints, refusing `peft_config=`), deep inside their code.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

# Modules whose presence says the process trains with a library that looks for `peft` (not accelerate alone:
# transformers imports it with every model).
_TRAINING_LIBRARIES = ("trl", "transformers.trainer")

_warned = False


def peft_is_oxpeft() -> bool | None:
    """True if `import peft` gives oxpeft's alias, False if it gives the real peft, None if there is no peft."""
    loaded = sys.modules.get("peft")
    if loaded is not None:
        return bool(getattr(loaded, "__oxpeft__", False))
    try:
        spec = importlib.util.find_spec("peft")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return "__oxpeft__" in f.read(65536)
    except OSError:
        return None


def warn_unless_peft_is_oxpeft() -> None:
    """Once per process, where TRL or transformers' Trainer is loaded and `import peft` is not oxpeft, say in one
    line what will go wrong and the command that fixes it."""
    global _warned
    if _warned or not any(name in sys.modules for name in _TRAINING_LIBRARIES):
        return
    state = peft_is_oxpeft()
    if state:
        return
    _warned = True
    found = "the real peft" if state is False else "no peft"
    warnings.warn(
        f"`import peft` finds {found} here, so TRL / transformers' Trainer / accelerate will not recognise oxpeft "
        "models and configs; run `oxpeft alias install` (in an environment without the real peft) first",
        stacklevel=3,
    )
