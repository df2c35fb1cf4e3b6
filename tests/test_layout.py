"""The package follows HF PEFT's module layout, and its modules depend downward only (no import circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import oxpeft

PACKAGE = Path(oxpeft.__file__).resolve().parent

# HF PEFT's module paths that oxpeft implements, with names code written for PEFT imports from each.
PEFT_PATHS: dict[str, list[str]] = {
    "config": ["PeftConfig", "PromptLearningConfig"],
    "mapping": ["PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "get_peft_config", "inject_adapter_in_model"],
    "mapping_func": ["get_peft_model"],
    "auto": ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification"],
    "peft_model": ["PeftModel", "PeftModelForCausalLM", "PeftModelForSequenceClassification", "get_layer_status",
                   "get_model_status", "TunerLayerStatus", "TunerModelStatus"],
    "tuners": ["LoraConfig", "LoraModel", "IA3Config", "AdaLoraConfig", "PromptEmbedding", "PrefixEncoder"],
    "tuners.tuners_utils": ["BaseTuner", "BaseTunerLayer", "check_target_module_exists", "_find_minimal_target_modules"],
    "tuners.lycoris_utils": ["LycorisConfig", "LycorisLayer", "LycorisTuner"],
    "tuners.lora": ["LoraConfig", "LoraModel", "LoraLayer", "Linear", "Embedding", "Conv2d"],
    "tuners.lora.config": ["LoraConfig"],
    "tuners.lora.layer": ["LoraLayer", "Linear", "Embedding", "Conv2d"],
    "tuners.lora.model": ["LoraModel"],
    "tuners.lora.dora": ["DoraMagnitude"],
    "tuners.ia3": ["IA3Config", "IA3Model"],
    "tuners.ia3.config": ["IA3Config"],
    "tuners.ia3.layer": ["IA3Layer", "Linear"],
    "tuners.ia3.model": ["IA3Model"],
    "tuners.loha": ["LoHaConfig", "LoHaModel"],
    "tuners.loha.config": ["LoHaConfig"],
    "tuners.loha.layer": ["LoHaLayer"],
    "tuners.loha.model": ["LoHaModel"],
    "tuners.lokr": ["LoKrConfig", "LoKrModel"],
    "tuners.lokr.config": ["LoKrConfig"],
    "tuners.lokr.layer": ["LoKrLayer"],
    "tuners.lokr.model": ["LoKrModel"],
    "tuners.adalora": ["AdaLoraConfig", "AdaLoraModel"],
    "tuners.adalora.config": ["AdaLoraConfig"],
    "tuners.adalora.layer": ["AdaLoraLayer"],
    "tuners.adalora.model": ["AdaLoraModel"],
    "tuners.prompt_tuning": ["PromptTuningConfig", "PromptTuningInit", "PromptEmbedding"],
    "tuners.prompt_tuning.config": ["PromptTuningConfig", "PromptTuningInit"],
    "tuners.prompt_tuning.model": ["PromptEmbedding"],
    "tuners.p_tuning": ["PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder"],
    "tuners.p_tuning.config": ["PromptEncoderConfig", "PromptEncoderReparameterizationType"],
    "tuners.p_tuning.model": ["PromptEncoder"],
    "tuners.prefix_tuning": ["PrefixTuningConfig", "PrefixEncoder"],
    "tuners.prefix_tuning.config": ["PrefixTuningConfig"],
    "tuners.prefix_tuning.model": ["PrefixEncoder"],
    "utils": ["PeftType", "TaskType", "ModulesToSaveWrapper", "_get_submodules", "infer_device", "CONFIG_NAME"],
    "utils.peft_types": ["PeftType", "TaskType", "register_peft_method"],
    "utils.constants": ["CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "INCLUDE_LINEAR_LAYERS_SHORTHAND"],
    "utils.save_and_load": ["get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights"],
    "utils.warning": ["PeftWarning"],
    "utils.error": ["PeftError", "NoMatchingPeftModuleError"],
    "utils.other": ["AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "_get_submodules", "infer_device",
                    "cast_mixed_precision_params"],
    "optimizers": ["create_loraplus_optimizer"],
    "optimizers.loraplus": ["create_loraplus_optimizer"],
    "import_utils": ["is_bnb_available", "is_bnb_4bit_available", "is_transformers_ge_v5", "is_hqq_available"],
}


def all_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("path", sorted(PEFT_PATHS))
def test_peft_module_paths_hold_peft_names(path):
    module = __import__(f"oxpeft.{path}", fromlist=["_"])
    missing = [name for name in PEFT_PATHS[path] if not hasattr(module, name)]
    assert not missing, f"oxpeft.{path} lacks {missing}"


def test_same_objects_wherever_peft_exports_them():
    from oxpeft import utils
    from oxpeft.tuners import tuners_utils
    from oxpeft.utils import other, peft_types

    assert oxpeft.PeftType is utils.PeftType is peft_types.PeftType
    assert utils.ModulesToSaveWrapper is other.ModulesToSaveWrapper
    assert oxpeft.LoraConfig is oxpeft.tuners.lora.LoraConfig
    assert issubclass(oxpeft.tuners.lora.Linear, tuners_utils.BaseTunerLayer)


def test_every_method_is_registered():
    import oxpeft.tuners  # noqa: F401  (importing the tuners registers them)

    for peft_type in oxpeft.PeftType:
        assert peft_type in oxpeft.PEFT_TYPE_TO_CONFIG_MAPPING, peft_type
        assert peft_type in oxpeft.PEFT_TYPE_TO_TUNER_MAPPING, peft_type
    config = oxpeft.get_peft_config({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    assert type(config) is oxpeft.LoraConfig and config.r == 4


def test_each_module_imports_on_its_own_in_a_fresh_interpreter():
    """No module needs another to have been imported first (which a circle would hide)."""

    def run(name: str) -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        return name, "" if out.returncode == 0 else out.stderr.strip().splitlines()[-1]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = {name: err for name, err in pool.map(run, all_modules()) if err}
    assert not failures, failures


def _imports(path: Path, module: str) -> set[str]:
    """The oxpeft modules `module` imports anywhere, at import time or inside a function (only the
    TYPE_CHECKING blocks, which never run, are left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                found |= {alias.name for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom):
                base = inner.module or ""
                if inner.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - inner.level + 1] + ([base] if base else []))
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in inner.names}
    known = set(all_modules())
    return {name for name in found if name in known and name != module}


def test_no_import_circle():
    """Modules depend downward only: the graph of import statements, including those inside functions, has no
    cycle (a package importing its own submodules is the one exception, as in any Python package). The one
    import by name, of `oxpeft.tuners` on the first registry lookup, is what registers the methods."""
    modules = all_modules()
    graph = {}
    for name in modules:
        path = PACKAGE.parent.joinpath(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        graph[name] = {dep for dep in _imports(path, name) if not dep.startswith(name + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in modules:
        if name not in state:
            visit(name)
