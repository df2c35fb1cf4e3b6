"""Several adapters: switching, deleting, per-sample mixing and weighted combinations, against HF PEFT."""

from __future__ import annotations

import pytest
import torch

import oxpeft
from conftest import logits, make_llama, twin

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")


@pytest.fixture
def two_peft_adapters(tmp_path):
    """Two random adapters written by HF PEFT: 'default' in tmp_path, 'second' in tmp_path/second."""
    base = make_llama()
    torch.manual_seed(11)
    model = peft.get_peft_model(
        twin(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.add_adapter(
        "second", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    return base, tmp_path


def _load_both(base, path):
    ours = oxpeft.PeftModel.from_pretrained(twin(base), path)
    ours.load_adapter(path / "second", "second")
    theirs = peft.PeftModel.from_pretrained(twin(base), str(path))
    theirs.load_adapter(str(path / "second"), "second")
    return ours, theirs


def test_load_adapter_does_not_activate_and_set_adapter_switches_training(two_peft_adapters, input_ids):
    base, path = two_peft_adapters
    ours = oxpeft.PeftModel.from_pretrained(twin(base), path, is_trainable=True)
    ours.load_adapter(path / "second", "second", is_trainable=True)
    assert ours.active_adapter == "default"
    # As PEFT (#2759): a trainable load gives the inactive adapter trainable weights; set_adapter then decides.
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {n.split(".")[-2] for n in trainable} == {"default", "second"}
    ours.set_adapter("second")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)


def test_switching_takes_no_weight_copies(two_peft_adapters, input_ids):
    base, path = two_peft_adapters
    ours, theirs = _load_both(base, path)
    pointers = {n: p.data_ptr() for n, p in ours.named_parameters()}
    for name in ["second", "default", "second"]:
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)
    assert pointers == {n: p.data_ptr() for n, p in ours.named_parameters()}


def test_several_active_adapters_add_up(two_peft_adapters, input_ids):
    base, path = two_peft_adapters
    ours, theirs = _load_both(base, path)
    ours.base_model.set_adapter(["default", "second"])
    theirs.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)


def test_delete_adapter(two_peft_adapters, input_ids):
    base, path = two_peft_adapters
    ours, _ = _load_both(base, path)
    ours.set_adapter("second")
    ours.delete_adapter("second")
    assert list(ours.peft_config) == ["default"] and ours.active_adapter == "default"
    assert not any(".second." in n for n, _ in ours.named_parameters())
    only_default = oxpeft.PeftModel.from_pretrained(twin(base), path)
    torch.testing.assert_close(logits(ours, input_ids), logits(only_default, input_ids))
    with pytest.raises(ValueError, match="Adapter second does not exist"):
        ours.delete_adapter("second")


def test_mixed_batch_matches_each_adapter_alone_and_peft(two_peft_adapters):
    base, path = two_peft_adapters
    ours, theirs = _load_both(base, path)
    x = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(4))
    names = ["second", "__base__", "default"]
    with torch.no_grad():
        mixed = ours(input_ids=x, adapter_names=names).logits
        expected_peft = theirs(input_ids=x, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected_peft, atol=1e-5, rtol=0)
    ours.set_adapter("second")
    torch.testing.assert_close(mixed[0], logits(ours, x[:1])[0], atol=1e-5, rtol=0)
    with ours.disable_adapter():
        torch.testing.assert_close(mixed[1], logits(ours, x[1:2])[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown adapter"):
        ours(input_ids=x, adapter_names=["nope", "default", "default"])


def test_mixed_batch_generate(two_peft_adapters):
    base, path = two_peft_adapters
    ours, theirs = _load_both(base, path)
    x = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, adapter_names=["second", "default"])
    assert torch.equal(ours.generate(input_ids=x, **kwargs), theirs.generate(input_ids=x, **kwargs))


@pytest.mark.parametrize(
    "combination, extra",
    [
        ("linear", {}),
        ("cat", {}),
        ("svd", {}),
        ("svd", {"svd_rank": 3}),
        ("ties", {"density": 0.5}),
        ("ties_svd", {"density": 0.7, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.6}),
    ],
)
def test_weighted_adapters_match_peft(two_peft_adapters, input_ids, tmp_path, combination, extra):
    base, path = two_peft_adapters
    ours, theirs = _load_both(base, path)
    args = (["default", "second"], [0.7, -0.4], "mix")
    ours.add_weighted_adapter(*args, combination_type=combination, **extra)
    theirs.add_weighted_adapter(*args, combination_type=combination, **extra)
    assert ours.active_adapter == "default"
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)

    # what oxpeft saves for the combination loads in PEFT with the same outputs
    ours.save_pretrained(tmp_path / "saved", selected_adapters=["mix"])
    reloaded = peft.PeftModel.from_pretrained(twin(base), str(tmp_path / "saved" / "mix"))
    torch.testing.assert_close(logits(reloaded, input_ids), logits(ours, input_ids), atol=1e-5, rtol=0)


def test_cat_is_exactly_the_weighted_sum_of_deltas(two_peft_adapters):
    base, path = two_peft_adapters
    ours, _ = _load_both(base, path)
    ours.add_weighted_adapter(["default", "second"], [0.5, 2.0], "mix", combination_type="cat")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    expected = 0.5 * layer.get_delta_weight("default") + 2.0 * layer.get_delta_weight("second")
    torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=1e-5)


def test_weighted_adapter_errors(two_peft_adapters):
    base, path = two_peft_adapters
    ours, _ = _load_both(base, path)
    with pytest.raises(ValueError, match="unknown adapter"):
        ours.add_weighted_adapter(["default", "nope"], [1, 1], "mix")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        ours.add_weighted_adapter(["default", "second"], [1], "mix")
    with pytest.raises(ValueError, match="needs a density"):
        ours.add_weighted_adapter(["default", "second"], [1, 1], "mix", combination_type="ties")
    assert "mix" not in ours.peft_config


def test_multiple_adapters_saved_by_oxpeft_load_in_peft(tmp_path, input_ids):
    base = make_llama()
    torch.manual_seed(3)
    ours = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ours.add_adapter("b", oxpeft.LoraConfig(r=2, target_modules=["v_proj", "k_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "b"), "b")
    for name in ["default", "b"]:
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)


def test_a_trainable_adapter_that_is_not_active_is_loud(two_peft_adapters):
    base, path = two_peft_adapters
    model = oxpeft.PeftModel.from_pretrained(twin(base), path, is_trainable=True)
    with pytest.warns(UserWarning, match=r"'second' is added but not active.*set_adapter\('second'\)"):
        model.load_adapter(path / "second", "second", is_trainable=True)
    with pytest.warns(UserWarning, match="not active"):
        model.add_adapter("third", oxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        model.load_adapter(path / "second", "inference-only")  # not trainable: switching for inference is normal


class _Layers(torch.nn.Module):
    """One Embedding, one Conv2d and one Linear, so that every kind of DoRA norm (rows, columns, kernels) is merged."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 12)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.lin = torch.nn.Linear(12, 6)

    def forward(self, ids, image):
        return self.lin(self.emb(ids)).sum(1), self.conv(image).flatten(1)


@pytest.mark.parametrize("first_dora", [False, True])
def test_stacked_dora_merge_equals_the_unmerged_forward_and_peft(first_dora):
    import peft

    torch.manual_seed(0)
    base = _Layers()
    ids, image = torch.randint(0, 20, (2, 5)), torch.randn(2, 3, 6, 6)
    outputs = {}
    for lib in (oxpeft, peft):
        model = lib.get_peft_model(
            twin(base),
            lib.LoraConfig(target_modules=["emb", "conv", "lin"], use_dora=first_dora, init_lora_weights=False),
            adapter_name="one",
        )
        model.add_adapter("two", lib.LoraConfig(target_modules=["emb", "conv", "lin"], use_dora=True,
                                                init_lora_weights=False))
        torch.manual_seed(1)
        with torch.no_grad():  # the same values in both libraries: the parameters are named alike
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.rand_like(p) + 1.0 if "magnitude" in name else torch.randn_like(p) * 0.3)
        model.base_model.set_adapter(["one", "two"])
        with torch.no_grad():
            forward = model(ids, image)
            model.merge_adapter(["one", "two"])
            merged = model(ids, image)
            model.unmerge_adapter()
            unmerged = model(ids, image)
            weights = {k: v.clone() for k, v in model.merge_and_unload(adapter_names=["one", "two"]).state_dict().items()}
        for f, m, u in zip(forward, merged, unmerged):
            torch.testing.assert_close(m, f, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(u, f, rtol=1e-5, atol=1e-5)
        outputs[lib.__name__] = weights
    for key, theirs in outputs["peft"].items():
        torch.testing.assert_close(outputs["oxpeft"][key], theirs, rtol=1e-5, atol=1e-6, msg=key)
