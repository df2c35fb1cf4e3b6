"""AdaLoRA training: the rank budget falls to target_r by total_step - tfinal, the same triplets as HF PEFT's
allocator are kept, the orthogonality penalty is added to the training loss, and the pruned adapter saves
and reloads (resized) in both libraries."""

from __future__ import annotations

import json
import os

import oxpeft
import pytest
import torch
from conftest import make_llama, twin
from safetensors import safe_open

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")

TARGETS = ["q_proj", "v_proj"]
N_MODULES = 2 * len(TARGETS)  # two decoder layers
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12, deltaT=1)


def config(**overrides) -> dict:
    # CAUSAL_LM: HF PEFT adds the penalty only in task models (its base PeftModel.forward skips the tuner).
    base = dict(SCHEDULE, target_modules=TARGETS, lora_alpha=8, orth_reg_weight=0.1, task_type="CAUSAL_LM")
    return dict(base, **overrides)


@torch.no_grad()
def perturb_trainable(model, seed: int = 3, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def kept_ranks(model) -> int:
    """Triplets still alive: nonzero singular values over all AdaLoRA layers."""
    return sum(int((e != 0).sum()) for n, e in model.named_parameters() if ".lora_E." in n)


def train(model, update, batch: torch.Tensor) -> tuple[list[float], list[int]]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses, kept = [], []
    for step in range(SCHEDULE["total_step"]):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        update(step)
        optimizer.zero_grad()
        losses.append(loss.item())
        kept.append(kept_ranks(model))
    model.eval()
    return losses, kept


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same adapter trained through the whole schedule by oxpeft and by HF PEFT, both saved."""
    root = tmp_path_factory.mktemp("adalora")
    base = make_llama()
    torch.manual_seed(5)
    batch = torch.randint(0, 256, (2, 12))

    ours = oxpeft.get_peft_model(twin(base), oxpeft.AdaLoraConfig(**config()))
    perturb_trainable(ours)
    ours.save_pretrained(root / "start")
    theirs = peft.PeftModel.from_pretrained(twin(base), str(root / "start"), is_trainable=True)

    our_losses, our_kept = train(ours, ours.update_and_allocate, batch)
    their_losses, their_kept = train(theirs, theirs.base_model.update_and_allocate, batch)
    ours.save_pretrained(root / "ours")
    theirs.save_pretrained(root / "theirs")
    return dict(
        base=base,
        batch=batch,
        root=root,
        ours=ours,
        theirs=theirs,
        our_losses=our_losses,
        our_kept=our_kept,
        their_losses=their_losses,
        their_kept=their_kept,
    )


def test_budget_reaches_target_r_by_tfinal(trained):
    kept = trained["our_kept"]
    final_step = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    init_budget, target_budget = SCHEDULE["init_r"] * N_MODULES, SCHEDULE["target_r"] * N_MODULES
    assert kept[: SCHEDULE["tinit"] + 1] == [init_budget] * (SCHEDULE["tinit"] + 1)  # warm-up: nothing pruned
    assert all(a >= b for a, b in zip(kept, kept[1:])), kept  # the budget only falls
    allocator = trained["ours"].base_model.rank_allocator
    for step in range(SCHEDULE["total_step"]):
        assert kept[step] <= allocator.budget_schedule(step)[0]
    # From total_step - tfinal on, exactly target_r ranks per module on average stay, and stay pruned.
    assert kept[final_step:] == [target_budget] * (SCHEDULE["total_step"] - final_step), kept
    pattern = trained["ours"].peft_config["default"].rank_pattern
    assert sorted(pattern) == sorted(f"model.layers.{i}.self_attn.{t}.lora_E" for i in range(2) for t in TARGETS)
    assert sum(sum(mask) for mask in pattern.values()) == target_budget


def test_training_lowers_the_loss(trained):
    losses = trained["our_losses"]
    assert losses[-1] < losses[0] - 0.1, losses


def test_same_ranks_and_losses_as_peft(trained):
    """Same starting adapter, same data: the same losses (so the orthogonality penalty matches) and the same
    triplets pruned at every step."""
    torch.testing.assert_close(
        torch.tensor(trained["our_losses"]), torch.tensor(trained["their_losses"]), atol=1e-4, rtol=0
    )
    assert trained["our_kept"] == trained["their_kept"]
    theirs = trained["theirs"].peft_config["default"].rank_pattern
    ours = trained["ours"].peft_config["default"].rank_pattern
    assert {k.replace(".default", ""): [bool(v) for v in m] for k, m in theirs.items()} == ours


def test_pruned_adapter_is_saved_resized(trained):
    root = trained["root"]
    pattern = trained["ours"].peft_config["default"].rank_pattern
    with safe_open(os.path.join(root / "ours", "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, mask in pattern.items():
        module = key[: -len(".lora_E")]
        kept = sum(mask)
        assert shapes[f"base_model.model.{module}.lora_E"] == (kept, 1)
        assert shapes[f"base_model.model.{module}.lora_A"] == (kept, 64)
        assert shapes[f"base_model.model.{module}.lora_B"][1] == kept
    saved = json.loads((root / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern and saved["peft_type"] == "ADALORA"
    with safe_open(os.path.join(root / "theirs", "adapter_model.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == shapes


@pytest.mark.parametrize("saved_by", ["ours", "theirs"])
@pytest.mark.parametrize("loader", ["oxpeft", "peft"])
def test_pruned_adapter_reloads(trained, saved_by, loader):
    x = trained["batch"]
    with torch.no_grad():
        expected = trained[saved_by](input_ids=x).logits
    lib = oxpeft if loader == "oxpeft" else peft
    loaded = lib.PeftModel.from_pretrained(twin(trained["base"]), str(trained["root"] / saved_by))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, atol=1e-5, rtol=0)
    if loader == "oxpeft":
        layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
        pattern = trained[saved_by].peft_config["default"].rank_pattern
        mask = (
            pattern.get("model.layers.0.self_attn.q_proj.lora_E")
            or pattern["model.layers.0.self_attn.q_proj.lora_E.default"]
        )
        assert layer.r["default"] == sum(mask) and layer.ranknum["default"] == SCHEDULE["init_r"]
        merged = loaded.merge_and_unload()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)


def test_orthogonal_penalty_is_added_in_training_only():
    model = oxpeft.get_peft_model(make_llama(), oxpeft.AdaLoraConfig(**config(orth_reg_weight=0.5)))
    perturb_trainable(model)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        eval_loss = model.eval()(input_ids=x, labels=x).loss
        train_loss = model.train()(input_ids=x, labels=x).loss
        penalty = model.orthogonal_regularization()
    assert penalty > 0
    torch.testing.assert_close(train_loss, eval_loss + 0.5 * penalty)
    model.merge_and_unload()  # also removes the loss hook from the base model
    with torch.no_grad():
        assert model.get_base_model().train()(input_ids=x, labels=x).loss == pytest.approx(eval_loss.item(), abs=1e-4)


def test_fully_pruned_module_round_trips(tmp_path):
    """A module whose every triplet is pruned becomes rank 0 in the file; both libraries load it."""
    base = make_llama()
    model = oxpeft.get_peft_model(twin(base), oxpeft.AdaLoraConfig(**config(init_r=4, target_r=1)))
    perturb_trainable(model)
    cfg = model.peft_config["default"]
    cfg.rank_pattern = {
        "model.layers.0.self_attn.q_proj.lora_E": [False] * 4,
        "model.layers.0.self_attn.v_proj.lora_E": [True, False, True, False],
    }
    model.base_model.rank_allocator.apply_rank_pattern(cfg.rank_pattern)
    model.eval()
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    for lib in (oxpeft, peft):
        loaded = lib.PeftModel.from_pretrained(twin(base), str(tmp_path))
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, expected, atol=1e-5, rtol=0)
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].shape[0] == 0


def test_misuse_gets_clear_errors(tmp_path):
    model = oxpeft.get_peft_model(make_llama(), oxpeft.AdaLoraConfig(**config()))
    with pytest.raises(ValueError, match="supports only 1 trainable adapter"):
        model.add_adapter("second", oxpeft.AdaLoraConfig(**config()))
    model.add_adapter("frozen", oxpeft.AdaLoraConfig(**config(inference_mode=True)))
    with pytest.raises(ValueError, match="has no gradient: call update_and_allocate"):
        model.update_and_allocate(0)
    model.save_pretrained(tmp_path)
    loaded = oxpeft.PeftModel.from_pretrained(make_llama(), str(tmp_path))
    with pytest.raises(ValueError, match="needs a trainable AdaLoRA adapter"):
        loaded.update_and_allocate(0)
    with pytest.warns(UserWarning, match="does not use r"):
        oxpeft.AdaLoraConfig(**config(r=16))
