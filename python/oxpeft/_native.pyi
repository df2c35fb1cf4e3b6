"""Type stubs for the Rust core (`rust/src/python/`)."""

def version() -> str: ...

# Adapter configs across PEFT releases (rust/src/python/config.rs). All take and return JSON text.
def config_upgrade(config_json: str, strict: bool = True) -> tuple[str, list[str]]:
    """Read a config written by any PEFT release into the current schema; returns (JSON, notes)."""
    ...
def config_downgrade(config_json: str, target_version: str) -> str:
    """Rewrite a config so that PEFT `target_version` loads it and computes the same thing."""
    ...
def config_inspect(config_json: str) -> str:
    """Who wrote a config, which PEFT releases load it as is, and what it uses (a JSON object)."""
    ...
