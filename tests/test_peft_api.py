"""PEFT's API surface as code written for PEFT uses it: signatures, return values, attributes; HF PEFT is the oracle."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import oxpeft
from conftest import make_llama, twin
from oxpeft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

peft = pytest.importorskip("peft")


def _lora(lib, **kwargs):
    return lib.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kwargs})


@pytest.mark.parametrize("autocast", [True, False])
def test_add_adapter_takes_peft_positional_and_keyword_arguments(autocast):
    """`add_adapter(name, config, low_cpu_mem_usage, autocast_adapter_dtype)`, with PEFT's effect on adapter dtypes."""
    base = make_llama().to(torch.bfloat16)
    ours = oxpeft.get_peft_model(twin(base), _lora(oxpeft))
    theirs = peft.get_peft_model(twin(base), _lora(peft))
    ours.add_adapter("second", _lora(oxpeft), False, autocast_adapter_dtype=autocast)
    theirs.add_adapter("second", _lora(peft), False, autocast_adapter_dtype=autocast)

    def dtypes(model):
        return {n: p.dtype for n, p in model.named_parameters() if ".second." in n}

    assert dtypes(ours) == dtypes(theirs)
    assert set(dtypes(ours).values()) == {torch.float32 if autocast else torch.bfloat16}


def test_load_adapter_returns_peft_load_result(tmp_path):
    base = make_llama()
    torch.manual_seed(0)
    oxpeft.get_peft_model(twin(base), _lora(oxpeft)).save_pretrained(tmp_path / "a")
    ours = oxpeft.get_peft_model(twin(base), _lora(oxpeft))
    theirs = peft.get_peft_model(twin(base), _lora(peft))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = ours.load_adapter(tmp_path / "a", adapter_name="other")
        oracle = theirs.load_adapter(str(tmp_path / "a"), adapter_name="other")
    assert mine.unexpected_keys == oracle.unexpected_keys == []
    assert sorted(mine.missing_keys) == sorted(oracle.missing_keys)
    assert not [k for k in mine.missing_keys if ".other." in k]


def test_set_peft_model_state_dict_ignore_mismatched_sizes(tmp_path):
    model = oxpeft.get_peft_model(make_llama(), _lora(oxpeft))
    state = oxpeft.get_peft_model_state_dict(model)
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key] = torch.zeros(8, 64)  # r=8 where the model has r=4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        oxpeft.set_peft_model_state_dict(model, state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # unchanged on refusal
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        result = oxpeft.set_peft_model_state_dict(model, state, ignore_mismatched_sizes=True)
    skipped = key.replace(".lora_A.", ".lora_A.default.")
    assert skipped in result.missing_keys and result.unexpected_keys == []


def test_modules_to_save_wrapper_is_an_auxiliary_training_wrapper_with_attribute_passthrough():
    base = make_llama()
    model = oxpeft.get_peft_model(base, _lora(oxpeft, modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper) and isinstance(wrapper, AuxiliaryTrainingWrapper)
    active = wrapper.modules_to_save["default"]
    assert wrapper.weight is active.weight and wrapper.bias is None
    assert wrapper.in_features == 64 and wrapper.out_features == 256
    assert wrapper.active_adapter == "default" and wrapper.active_adapters == ["default"]
    wrapper.enable_adapters(False)
    assert wrapper.weight is wrapper.original_module.weight and wrapper.disable_adapters
    wrapper.enable_adapters(True)
    clone = copy.deepcopy(wrapper)
    assert torch.equal(clone.weight, wrapper.weight) and clone.weight is not wrapper.weight
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute  # noqa: B018
    wrapper.set_adapter("default", inference_mode=True)
    assert not active.weight.requires_grad


def test_get_peft_config_and_inject_adapter_in_model_match_peft():
    config = oxpeft.get_peft_config({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    assert isinstance(config, oxpeft.LoraConfig) and config.r == 4
    with pytest.raises(ValueError, match="unsupported peft_type"):
        oxpeft.get_peft_config({"peft_type": "NOT_A_METHOD"})
    ours = oxpeft.inject_adapter_in_model(_lora(oxpeft), make_llama())
    theirs = peft.inject_adapter_in_model(_lora(peft), make_llama())
    assert type(ours).__name__ == "LlamaForCausalLM"
    names = lambda m: sorted(n for n, _ in m.named_parameters() if "lora_" in n)  # noqa: E731
    assert names(ours) == names(theirs)
    # Targets from an adapter state dict instead of the config.
    state = {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 128)}
    only = oxpeft.inject_adapter_in_model(_lora(oxpeft), make_llama(), state_dict=state)
    assert {n.split(".lora_")[0] for n, _ in only.named_parameters() if "lora_" in n} == {"model.layers.0.mlp.down_proj"}
    with pytest.raises(ValueError, match="prompt-learning"):
        oxpeft.inject_adapter_in_model(oxpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), nn.Linear(2, 2))


def test_import_utils_answer_as_peft_does_here():
    import oxpeft.import_utils as ours
    import peft.import_utils as theirs

    probes = [n for n in dir(theirs) if n.startswith("is_")]
    assert probes and not [n for n in probes if not hasattr(ours, n)]
    for name in probes:
        mine, oracle = getattr(ours, name), getattr(theirs, name)
        assert (mine() if callable(mine) else mine) == (oracle() if callable(oracle) else oracle), name


@pytest.mark.parametrize(
    "make_config",
    [
        lambda lib: _lora(lib, modules_to_save=["lm_head"]),
        lambda lib: _lora(lib, use_dora=True),
        lambda lib: lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        lambda lib: lib.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    ],
    ids=["lora-modules-to-save", "dora", "ia3", "prompt-tuning"],
)
def test_base_model_state_dict_round_trip_matches_peft(make_config):
    base = make_llama()
    ours = oxpeft.get_peft_model(twin(base), make_config(oxpeft))
    theirs = peft.get_peft_model(twin(base), make_config(peft))
    mine, oracle = oxpeft.get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs)
    assert sorted(mine) == sorted(oracle) == sorted(base.state_dict())
    assert all(torch.equal(mine[k], oracle[k]) for k in mine)

    other = make_llama(seed=7).state_dict()
    result = oxpeft.set_base_model_state_dict(ours, other)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(v, other[k]) for k, v in oxpeft.get_base_model_state_dict(ours).items())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        oxpeft.set_base_model_state_dict(ours, {**other, "not.a.key": torch.zeros(1)})
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())
    loose = oxpeft.set_base_model_state_dict(ours, {"not.a.key": torch.zeros(1)}, strict=False)
    assert loose.unexpected_keys == ["not.a.key"] and len(loose.missing_keys) == len(other)


def test_a_target_that_matches_nothing_is_peft_error_type():
    with pytest.raises(oxpeft.NoMatchingPeftModuleError, match="'q_prj' matches no module") as info:
        oxpeft.get_peft_model(make_llama(), _lora(oxpeft, target_modules=["q_prj"]))
    assert isinstance(info.value, ValueError) and isinstance(info.value, oxpeft.PeftError)


def test_layer_and_model_status_match_peft():
    base = make_llama()
    models = []
    for lib in (oxpeft, peft):
        model = lib.get_peft_model(twin(base), _lora(lib, modules_to_save=["lm_head"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_adapter("other", _lora(lib, target_modules=["q_proj"]))
        model.base_model.model.model.layers[0].self_attn.q_proj.merge(adapter_names=["other"])
        models.append(model)
    ours, theirs = models
    mine, oracle = oxpeft.get_layer_status(ours), peft.get_layer_status(theirs)
    assert [s.name for s in mine] == [s.name for s in oracle]
    for a, b in zip(mine, oracle):
        assert (a.module_type, a.enabled, a.active_adapters, a.merged_adapters) == (
            b.module_type, b.enabled, b.active_adapters, b.merged_adapters
        ), a.name  # fmt: skip
        assert (a.requires_grad, a.available_adapters, a.devices) == (b.requires_grad, b.available_adapters, b.devices)
    m, o = ours.get_model_status(), peft.get_model_status(theirs)
    for field in ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
                  "num_adapter_layers", "enabled", "active_adapters", "merged_adapters", "requires_grad",
                  "available_adapters", "devices"):  # fmt: skip
        assert getattr(m, field) == getattr(o, field), field
    with pytest.raises(ValueError, match="no adapter layers"):
        oxpeft.get_layer_status(make_llama())


def test_target_matching_helpers_answer_as_peft():
    from peft.tuners.tuners_utils import _find_minimal_target_modules as theirs_minimal
    from peft.tuners.tuners_utils import check_target_module_exists as theirs_check

    from oxpeft.tuners.tuners_utils import _find_minimal_target_modules, check_target_module_exists

    names = [n for n, _ in make_llama().named_modules() if n]
    configs = [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=r".*\.(q|k)_proj"),
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(target_modules="all-linear", exclude_modules=["o_proj"]),
        dict(target_modules=["proj"], exclude_modules=r".*mlp.*"),
    ]
    for kwargs in configs:
        ours, peft_config = oxpeft.LoraConfig(**kwargs), peft.LoraConfig(**kwargs)
        if kwargs["target_modules"] == "all-linear":
            continue  # resolved by the tuner against the model, not by this helper (in both libraries)
        for name in names:
            assert bool(check_target_module_exists(ours, name)) == bool(theirs_check(peft_config, name)), (kwargs, name)

    targets = [f"model.decoder.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "v_proj")]
    others = [f"model.encoder.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "k_proj")]
    others += [f"model.decoder.layers.{i}.self_attn.k_proj" for i in range(12)]
    for t, o in [(targets, others), (targets[:5], others), (["a.b", "c.b"], ["d.b"]), (["x"], ["y.x"])]:
        assert _find_minimal_target_modules(t, o) == theirs_minimal(t, o), (t[:2], o[:2])
    with pytest.raises(ValueError, match="share"):
        _find_minimal_target_modules(["a.b"], ["a.b"])


def test_loraplus_optimizer_groups_match_peft():
    from peft.optimizers import create_loraplus_optimizer as theirs_create

    from oxpeft.optimizers import create_loraplus_optimizer

    base = make_llama()
    kwargs = dict(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False, use_dora=False)
    ours = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(twin(base), peft.LoraConfig(**kwargs))
    # A DoRA adapter too: its magnitudes are 1-D, LoRA+'s B group without weight decay.
    ours.add_adapter("dora", oxpeft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    theirs.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "dora"])
    options = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-5, betas=(0.8, 0.9))
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **dict(options))
    oracle = theirs_create(theirs, torch.optim.AdamW, **dict(options))
    names = lambda model: {id(p): n for n, p in model.named_parameters()}  # noqa: E731
    ours_names, theirs_names = names(ours), names(theirs)
    assert len(mine.param_groups) == len(oracle.param_groups) == 4
    for a, b in zip(mine.param_groups, oracle.param_groups):
        assert (a["lr"], a["weight_decay"], a["betas"]) == (b["lr"], b["weight_decay"], b["betas"])
        assert sorted(ours_names[id(p)] for p in a["params"]) == sorted(theirs_names[id(p)] for p in b["params"])
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)


def test_cast_mixed_precision_params_matches_peft():
    ours = oxpeft.get_peft_model(make_llama(), _lora(oxpeft))
    theirs = peft.get_peft_model(make_llama(), _lora(peft))
    oxpeft.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        oxpeft.cast_mixed_precision_params(ours, torch.float64)


def test_auto_peft_model_loads_base_and_adapter_like_peft(tmp_path):
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = oxpeft.get_peft_model(make_llama(), _lora(oxpeft, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    ours = oxpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32)
    assert isinstance(ours, oxpeft.PeftModelForCausalLM)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM instead"):
        oxpeft.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="task_type=CAUSAL_LM"):
        oxpeft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    with pytest.raises(TypeError, match="from_pretrained"):
        oxpeft.AutoPeftModelForCausalLM()


def test_disable_adapter_restores_each_layers_state_and_nests():
    model = oxpeft.get_peft_model(make_llama(), _lora(oxpeft))
    layers = [m for m in model.modules() if isinstance(m, oxpeft.tuners.tuners_utils.BaseTunerLayer)]
    assert model.has_active_enabled_adapter
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
        with model.disable_adapter():
            assert all(m.disable_adapters for m in layers)
        assert all(m.disable_adapters for m in layers)  # the inner block does not re-enable
    assert all(not m.disable_adapters for m in layers) and model.has_active_enabled_adapter
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in layers)  # disabled before the block: still disabled after it
    model.enable_adapter_layers()
    layers[0].enable_adapters(False)  # an irregular state: PEFT's warning, and it comes back exactly
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert layers[0].disable_adapters and not any(m.disable_adapters for m in layers[1:])


def test_the_config_passed_is_the_config_kept(tmp_path):
    config = _lora(oxpeft)
    model = oxpeft.get_peft_model(make_llama(), config)
    assert model.peft_config["default"] is config
    model.save_pretrained(tmp_path)
    loaded = oxpeft.PeftModel.from_pretrained(make_llama(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode
    bad = _lora(oxpeft, target_modules=["nope"])
    before = dict(vars(bad))
    with pytest.raises(ValueError):
        oxpeft.get_peft_model(make_llama(), bad)
    assert vars(bad) == before  # a refused adapter leaves its config as it was
    with pytest.raises(ValueError, match="Adapter other does not exist"):
        model.delete_adapter("other")


def test_directly_injected_model_round_trips_its_adapter_state():
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = oxpeft.inject_adapter_in_model(_lora(oxpeft), make_llama())
    assert model.peft_config["default"].r == 4  # carried by the model, as PEFT does
    with torch.no_grad():
        before = model(input_ids=ids).logits
    state = oxpeft.get_peft_model_state_dict(model)
    theirs_model = peft.inject_adapter_in_model(_lora(peft), make_llama())
    assert sorted(state) == sorted(peft.get_peft_model_state_dict(theirs_model))
    torch.manual_seed(5)
    fresh = oxpeft.inject_adapter_in_model(_lora(oxpeft), make_llama())
    result = oxpeft.set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, before)
    assert len(oxpeft.get_layer_status(fresh)) == 4  # q_proj, v_proj in 2 layers


def test_push_to_hub_uploads_what_save_pretrained_writes(monkeypatch):
    """The Hub is not reachable here: the two HfApi calls are recorded instead, with the folder's files."""
    from huggingface_hub import HfApi

    calls = {}

    class Repo:
        repo_id = "someone/tiny-lora"

    def create_repo(self, repo_id, private=None, exist_ok=False):
        calls["create"] = (repo_id, private, exist_ok)
        return Repo()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), kwargs)
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = oxpeft.get_peft_model(make_llama(), _lora(oxpeft))
    assert model.push_to_hub("tiny-lora", private=True, commit_message="first") == "commit"
    assert calls["create"] == ("tiny-lora", True, True)
    repo, files, kwargs = calls["upload"]
    # The adapter folder only: never the base model's weights or config.
    assert repo == "someone/tiny-lora" and files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert kwargs["commit_message"] == "first" and kwargs["create_pr"] is False


def test_deleting_a_merged_adapter_is_refused_without_change():
    model = oxpeft.get_peft_model(make_llama(), _lora(oxpeft), adapter_name="a0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("a1", _lora(oxpeft))
    model.set_adapter("a1")
    model.merge_adapter()
    layers = [m for m in model.modules() if isinstance(m, oxpeft.tuners.tuners_utils.BaseTunerLayer)]
    before = [(list(m.merged_adapters), set(m._all_available_adapter_names())) for m in layers]
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['a1'\] while they are merged"):
        model.delete_adapter("a1")
    assert set(model.peft_config) == {"a0", "a1"}
    assert [(list(m.merged_adapters), set(m._all_available_adapter_names())) for m in layers] == before
    model.delete_adapter("a0")  # not merged: fine
    model.unmerge_adapter()
    model.delete_adapter("a1")
    assert not model.peft_config


def _card(folder):
    import re

    import yaml

    text = (folder / "README.md").read_text(encoding="utf-8")
    return yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1)), text


def test_save_pretrained_writes_peft_model_card(tmp_path):
    base = make_llama()
    oxpeft.get_peft_model(twin(base), _lora(oxpeft, task_type="CAUSAL_LM")).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(twin(base), _lora(peft, task_type="CAUSAL_LM")).save_pretrained(tmp_path / "theirs")
    (mine, text), (oracle, _) = _card(tmp_path / "ours"), _card(tmp_path / "theirs")
    for key in ("library_name", "tags", "base_model", "pipeline_tag"):
        assert mine.get(key) == oracle.get(key), key
    assert mine["library_name"] == "peft" and "lora" in mine["tags"]
    assert f"- oxpeft {oxpeft.__version__}" in text
    # An existing card keeps its text; saving again adds nothing twice.
    (tmp_path / "ours" / "README.md").write_text(text.replace("## Model Details", "## Model Details\n\nMy notes."))
    oxpeft.get_peft_model(twin(base), _lora(oxpeft, task_type="CAUSAL_LM")).save_pretrained(tmp_path / "ours")
    again = (tmp_path / "ours" / "README.md").read_text()
    assert "My notes." in again and again.count(f"- oxpeft {oxpeft.__version__}") == 1


def test_from_pretrained_takes_peft_loading_options(tmp_path):
    base = make_llama()
    torch.manual_seed(2)
    saved = oxpeft.get_peft_model(twin(base), _lora(oxpeft))
    saved.save_pretrained(tmp_path / "a")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = saved(input_ids=ids).logits
    loaded = oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "a", low_cpu_mem_usage=True, device_map="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    # key_mapping renames the file's keys first: a file from a model whose layers were named differently.
    from safetensors.torch import load_file, save_file

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_bytes((tmp_path / "a" / "adapter_config.json").read_bytes())
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k.replace(".self_attn.", ".attention."): v for k, v in state.items()}, tmp_path / "old" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "old")
    renamed = oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "old", key_mapping={r"\.attention\.": ".self_attn."})
    with torch.no_grad():
        torch.testing.assert_close(renamed(input_ids=ids).logits, expected)
    # ephemeral_gpu_offload only moves DoRA's initial norm to a GPU (none here): accepted, same result, not saved.
    offloaded = oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "a", ephemeral_gpu_offload=True)
    assert offloaded.peft_config["default"].runtime_config.ephemeral_gpu_offload is True
    assert "runtime_config" not in offloaded.peft_config["default"].to_dict()
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, expected)
    result = loaded.load_adapter(tmp_path / "a", "again", low_cpu_mem_usage=True, key_mapping={})
    assert result.unexpected_keys == [] and result.missing_keys == []


def test_set_adapter_inference_mode_and_targeted_module_names():
    ours = oxpeft.get_peft_model(make_llama(), _lora(oxpeft))
    theirs = peft.get_peft_model(make_llama(), _lora(peft))
    assert ours.targeted_module_names == theirs.targeted_module_names
    for model in (ours, theirs):
        model.set_adapter("default", inference_mode=True)
    grads = lambda m: {n: p.requires_grad for n, p in m.named_parameters() if "lora_" in n}  # noqa: E731
    assert grads(ours) == grads(theirs) and not any(grads(ours).values())
    ours.set_adapter("default")
    assert all(grads(ours).values())


def test_merging_again_warns_as_peft():
    model = oxpeft.get_peft_model(make_llama(), _lora(oxpeft))
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert oxpeft.LoraModel.uses_shared_state is False and oxpeft.IA3Model.uses_shared_state is False


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x).relu())


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_state_dict_of_an_fsdp_wrapped_model_has_peft_keys(bias):
    """FSDP (use_orig_params) inserts `_fsdp_wrapped_module` into module names but not into state-dict keys:
    the adapter's state dict is read through the wrapper, with PEFT's keys, and loads into a plain model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        base, x = _TwoLinear(), torch.randn(3, 10)
        states = {}
        for lib in (peft, oxpeft):
            model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["lin0"], bias=bias, init_lora_weights=False))
            if bias != "none":  # a trained bias, saved with the adapter
                with torch.no_grad():
                    model.base_model.model.lin0.base_layer.bias.fill_(1.23)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FSDP's notes on a one-process NO_SHARD group
                wrapped = FSDP(model.eval(), use_orig_params=True, device_id=torch.device("cpu"))
                expected = wrapped(x)
                states[lib.__name__] = lib.get_peft_model_state_dict(wrapped)
            fresh = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["lin0"], bias=bias)).eval()
            lib.set_peft_model_state_dict(fresh, states[lib.__name__])
            torch.testing.assert_close(fresh(x), expected)
        assert sorted(states["oxpeft"]) == sorted(states["peft"])
    finally:
        if started:
            dist.destroy_process_group()


def test_orthogonal_init_matches_peft_and_keeps_the_output():
    base = make_llama()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    models = {}
    for lib in (peft, oxpeft):
        torch.manual_seed(11)
        models[lib.__name__] = lib.get_peft_model(twin(base), _lora(lib, init_lora_weights="orthogonal"))
    ours, theirs = models["oxpeft"], models["peft"]
    state, mine = peft.get_peft_model_state_dict(theirs), oxpeft.get_peft_model_state_dict(ours)
    assert sorted(mine) == sorted(state)
    for key in state:
        torch.testing.assert_close(mine[key], state[key])
        assert mine[key].abs().sum() > 0  # both factors are non-zero ...
    with torch.no_grad():  # ... and B @ A = 0
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="even rank"):
        oxpeft.get_peft_model(twin(base), _lora(oxpeft, r=3, init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="Linear layers only"):
        oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="orthogonal"))


@pytest.mark.parametrize("method", ["lora-dora", "ia3", "loha", "adalora"])
def test_low_cpu_mem_usage_creates_meta_weights_that_loading_assigns(method, tmp_path):
    """As PEFT: low_cpu_mem_usage=True injects uninitialised adapter weights on the meta device; loading a state
    dict (from_pretrained, load_adapter, set_peft_model_state_dict) assigns the file's tensors to them."""
    configs = {
        "lora-dora": lambda lib: lib.LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False),
        "ia3": lambda lib: lib.IA3Config(target_modules=["lin0"], feedforward_modules=[], init_ia3_weights=False),
        "loha": lambda lib: lib.LoHaConfig(target_modules=["lin0"], init_weights=False),
        "adalora": lambda lib: lib.AdaLoraConfig(target_modules=["lin0"], total_step=10, init_lora_weights=False),
    }
    torch.manual_seed(0)
    base, x = _TwoLinear(), torch.randn(3, 10)
    model = oxpeft.get_peft_model(copy.deepcopy(base), configs[method](oxpeft)).eval()
    expected = model(x)
    model.save_pretrained(tmp_path)
    for lib in (peft, oxpeft):
        injected = lib.inject_adapter_in_model(configs[method](lib), copy.deepcopy(base), low_cpu_mem_usage=True)
        assert "meta" in {p.device.type for p in injected.parameters()}, lib.__name__
    injected = oxpeft.inject_adapter_in_model(configs[method](oxpeft), copy.deepcopy(base), low_cpu_mem_usage=True)
    state = {k.removeprefix("base_model.model."): v for k, v in oxpeft.get_peft_model_state_dict(model).items()}
    oxpeft.set_peft_model_state_dict(injected, state, low_cpu_mem_usage=True)
    assert {p.device.type for p in injected.parameters()} == {"cpu"}
    torch.testing.assert_close(injected.eval()(x), expected)
    loaded = oxpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    loaded.load_adapter(tmp_path, "other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(loaded(x), expected)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(x), expected)


def test_functional_api_matches_peft_on_injected_models():
    """`functional` (what transformers' adapter API calls): set_adapter, set_requires_grad, cast_adapter_dtype and
    delete_adapter on models with directly injected adapters, compared with PEFT's."""
    import peft.functional as theirs_fn

    import oxpeft.functional as ours_fn

    assert sorted(ours_fn.__all__) == sorted(theirs_fn.__all__)
    torch.manual_seed(0)
    base, x = _TwoLinear().half(), torch.randn(3, 10).half()
    models = {}
    for lib, fn in ((peft, theirs_fn), (oxpeft, ours_fn)):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        fn.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False), model, "a")
        torch.manual_seed(2)
        fn.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False), model, "b")
        fn.cast_adapter_dtype(model, "a")
        fn.set_adapter(model, "b")
        fn.set_requires_grad(model, "a", requires_grad=True)
        models[lib.__name__] = model
    grads = lambda m: {n: (p.requires_grad, p.dtype) for n, p in m.named_parameters()}  # noqa: E731
    assert grads(models["oxpeft"]) == grads(models["peft"])
    for lib, fn in ((peft, theirs_fn), (oxpeft, ours_fn)):
        assert fn.delete_adapter(models[lib.__name__], "b", prefix="lora_") == ["a"] or lib is peft
    ours, theirs = models["oxpeft"], models["peft"]
    assert sorted(k for k in ours.state_dict()) == sorted(k for k in theirs.state_dict())
    assert [m.active_adapters for m in ours.modules() if hasattr(m, "lora_A")] == [
        m.active_adapters for m in theirs.modules() if hasattr(m, "lora_A")
    ]
    torch.testing.assert_close(ours.float()(x.float()), theirs.float()(x.float()))


class _DeepMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict(dict(lin0=nn.Linear(16, 16), lin1=nn.Linear(16, 16))) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer["lin1"](layer["lin0"](x).relu())
        return x


@pytest.mark.parametrize("is_trainable", [False, True])
def test_trainable_loads_give_trainable_weights_as_peft(is_trainable, tmp_path):
    """PEFT (#2759): `load_adapter(..., is_trainable=True)` gives the new, inactive adapter trainable weights;
    `is_trainable=False` freezes it, whatever the other adapters are."""
    torch.manual_seed(0)
    base = _DeepMLP()
    config = lambda lib: lib.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=["layers.1.lin1"])  # noqa: E731
    oxpeft.get_peft_model(copy.deepcopy(base), config(oxpeft)).save_pretrained(tmp_path)
    grads = {}
    for lib in (peft, oxpeft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=is_trainable)
            model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
            model.load_adapter(tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
        grads[lib.__name__] = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads["oxpeft"] == grads["peft"]
    assert grads["oxpeft"]["base_model.model.layers.0.lin0.lora_A.opposite.weight"] is (not is_trainable)


def test_two_active_adapters_cannot_share_a_modules_to_save_copy():
    torch.manual_seed(0)
    model = oxpeft.get_peft_model(
        _DeepMLP(), oxpeft.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=["layers.0.lin1", "layers.1.lin1"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", oxpeft.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=["layers.1.lin1"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    # Nothing changed: every layer and wrapper still runs 'default' alone.
    assert {tuple(m.active_adapters) for m in model.modules() if hasattr(m, "_active_adapter")} == {("default",)}


def test_set_requires_grad_matches_peft():
    torch.manual_seed(0)
    base = _DeepMLP()
    grads = {}
    for lib in (peft, oxpeft):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["layers.0.lin0"]), "adapter0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_adapter(
                "adapter1", lib.LoraConfig(target_modules=["layers.0.lin0", "layers.1.lin0"], modules_to_save=["layers.2.lin0"])
            )
        steps = [{n: p.requires_grad for n, p in model.named_parameters()}]
        model.set_requires_grad(adapter_names="adapter1")
        steps.append({n: p.requires_grad for n, p in model.named_parameters()})
        model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
        steps.append({n: p.requires_grad for n, p in model.named_parameters()})
        grads[lib.__name__] = steps
    assert grads["oxpeft"] == grads["peft"]
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_requires_grad("nope")


def test_helpers_match_peft(tmp_path):
    import inspect

    import peft.helpers as theirs_helpers

    import oxpeft.helpers as ours_helpers

    base = make_llama()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    ours = oxpeft.get_peft_model(twin(base), _lora(oxpeft))  # no task type: forward(*args, **kwargs) in both
    theirs = peft.get_peft_model(twin(base), _lora(peft))
    for model, helpers in ((ours, ours_helpers), (theirs, theirs_helpers)):
        helpers.update_signature(model)
    for method in ("forward", "generate"):
        assert list(inspect.signature(getattr(ours, method)).parameters) == list(
            inspect.signature(getattr(theirs, method)).parameters
        )
    assert "input_ids" in inspect.signature(ours.forward).parameters
    causal = oxpeft.get_peft_model(twin(base), _lora(oxpeft, task_type="CAUSAL_LM"))
    ours_helpers.update_forward_signature(causal)
    assert "input_ids" in inspect.signature(causal.forward).parameters
    with torch.no_grad():
        plain = ours(input_ids=ids).logits  # the forward still runs
        with ours_helpers.rescale_adapter_scale(ours, 0.5):
            assert ours.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 0.5 * 8 / 4
        torch.testing.assert_close(ours(input_ids=ids).logits, plain)
        with ours_helpers.disable_input_dtype_casting(ours):
            assert not any(m.cast_input_dtype_enabled for m in ours.modules() if hasattr(m, "cast_input_dtype_enabled"))
        assert all(m.cast_input_dtype_enabled for m in ours.modules() if hasattr(m, "cast_input_dtype_enabled"))
    with pytest.raises(ValueError, match="only supported for models with `LoraLayer`s"):
        with ours_helpers.rescale_adapter_scale(nn.Linear(2, 2), 0.5):
            pass
    ours.save_pretrained(tmp_path)
    assert ours_helpers.check_if_peft_model(str(tmp_path)) and not ours_helpers.check_if_peft_model(str(tmp_path / "x"))


def test_fsdp_auto_wrap_policy_wraps_what_peft_wraps():
    """transformers' FSDP setup takes `peft.utils.other.fsdp_auto_wrap_policy` for PEFT models: the same modules
    become FSDP units (decoder layers, trainable adapter leaves) as with PEFT's policy."""
    from peft.utils.other import fsdp_auto_wrap_policy as theirs_policy

    from oxpeft.utils.other import fsdp_auto_wrap_policy as ours_policy

    base = make_llama()
    decisions = {}
    for lib, policy in ((peft, theirs_policy), (oxpeft, ours_policy)):
        model = lib.get_peft_model(twin(base), _lora(lib, task_type="CAUSAL_LM"))
        wrap = policy(model)
        decisions[lib.__name__] = [
            name for name, module in model.named_modules() if wrap(module=module, recurse=False, nonwrapped_numel=1)
        ]
    assert decisions["oxpeft"] == decisions["peft"]
    assert any(name.endswith("lora_A.default") for name in decisions["oxpeft"])
    assert any(name.endswith("layers.0") for name in decisions["oxpeft"])
