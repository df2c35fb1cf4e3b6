"""LoRA on nn.Conv1d / Conv2d / Conv3d (grouped too) and DoRA on convolutions and embeddings; (IA)³ on every
convolution: the real HF PEFT is the oracle for state-dict keys and shapes, saved files (both ways) and outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import oxpeft

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")

# PEFT takes a LoRA bias on a convolution for an unsharded ZeRO-3 tensor and says so; it is not one.
pytestmark = pytest.mark.filterwarnings("ignore:.*invalid shape.*")


class ConvNet(nn.Module):
    """An embedding feeding a Conv1d, a padded Conv2d, a Conv3d and a grouped Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.conv2d = nn.Conv2d(4, 6, 3, padding=1)
        self.conv3d = nn.Conv3d(4, 6, 2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids).transpose(1, 2)  # (batch, 4, 8)
        image = e.reshape(e.shape[0], 4, 2, 4)
        volume = torch.stack([image, image.flip(-1)], dim=2)  # (batch, 4, 2, 2, 4)
        return torch.cat(
            [
                self.conv1d(e).flatten(1),
                self.conv2d(image).flatten(1),
                self.conv3d(volume).flatten(1),
                self.grouped(torch.cat([image, image * 0.5], dim=1)).flatten(1),
            ],
            dim=1,
        )


def _base() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


IDS = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))

LORA_CASES = {
    "conv1d": dict(target_modules=["conv1d"]),
    "conv2d-3d-emb": dict(target_modules=["conv2d", "conv3d", "emb"]),
    "conv-bias": dict(target_modules=["conv1d", "conv3d"], lora_bias=True),
    "rslora-dropout": dict(target_modules=["conv1d", "conv2d", "conv3d"], use_rslora=True, lora_dropout=0.1),
    "dora-conv": dict(target_modules=["conv1d", "conv2d", "conv3d"], use_dora=True),
    "dora-emb": dict(target_modules=["emb"], use_dora=True),
    "grouped": dict(target_modules=["grouped"]),
    "grouped-dora": dict(target_modules=["grouped"], use_dora=True),
}


def _pair(kwargs: dict) -> tuple:
    """The same random adapter in PEFT and in oxpeft (oxpeft's tensors loaded from PEFT's state dict)."""
    kwargs = dict(kwargs, r=4, init_lora_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(**kwargs)).eval()
    ours = oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(**kwargs)).eval()
    state = peft.get_peft_model_state_dict(theirs)
    mine = oxpeft.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in state.items()}
    result = oxpeft.set_peft_model_state_dict(ours, state)
    assert not result.unexpected_keys
    return theirs, ours


@pytest.mark.filterwarnings("ignore:.*groups.*")
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_layer_types_match_peft(case):
    theirs, ours = _pair(LORA_CASES[case])
    expected = theirs(IDS)
    assert not torch.allclose(expected, _base()(IDS), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(ours(IDS), expected, atol=1e-6, rtol=1e-6)
    with ours.disable_adapter():
        torch.testing.assert_close(ours(IDS), _base()(IDS))


@pytest.mark.filterwarnings("ignore:.*groups.*")
@pytest.mark.parametrize("case", ["conv1d", "conv2d-3d-emb", "conv-bias", "dora-conv", "dora-emb"])
def test_lora_layer_types_merge_like_peft(case):
    theirs, ours = _pair(LORA_CASES[case])
    expected = theirs(IDS)
    ours.merge_adapter()
    torch.testing.assert_close(ours(IDS), expected, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(IDS), expected, atol=1e-5, rtol=1e-5)
    merged_theirs = theirs.merge_and_unload()(IDS)
    merged = ours.merge_and_unload()
    assert type(merged.conv1d) is nn.Conv1d and type(merged.emb) is nn.Embedding
    torch.testing.assert_close(merged(IDS), merged_theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*groups.*")
def test_lora_grouped_conv_trains_and_refuses_merge():
    with pytest.warns(UserWarning, match="groups=2"):
        model = oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(r=4, target_modules=["grouped"], init_lora_weights=False))
    assert model.base_model.model.grouped.lora_B["default"].weight.shape == (8, 2, 1, 1)  # PEFT's grouped B
    before = model(IDS)
    with pytest.raises(ValueError, match="grouped convolution .*cannot be merged"):
        model.merge_adapter()
    torch.testing.assert_close(model(IDS), before)  # nothing changed
    with pytest.raises(ValueError, match="rank divisible by the groups, got r=3"):
        oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(r=3, target_modules=["grouped"]))
    loss = model(IDS).square().mean()
    loss.backward()
    assert model.base_model.model.grouped.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("case", ["dora-conv", "dora-emb", "conv2d-3d-emb"])
def test_lora_layer_types_files_move_both_ways(case, tmp_path):
    theirs, ours = _pair(LORA_CASES[case])
    expected = theirs(IDS)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_peft = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded_in_peft(IDS), expected, atol=1e-6, rtol=1e-6)
    loaded_in_oxpeft = oxpeft.PeftModel.from_pretrained(_base(), tmp_path / "theirs").eval()
    torch.testing.assert_close(loaded_in_oxpeft(IDS), expected, atol=1e-6, rtol=1e-6)


def test_dora_initialisation_matches_peft_and_keeps_the_output():
    """With the default init (B = 0), DoRA's magnitude is the norm of the base weight: the same tensor as PEFT's,
    and the adapted model gives the base model's output."""
    kwargs = dict(target_modules=["conv1d", "conv2d", "conv3d", "emb"], use_dora=True, r=4)
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(**kwargs))
    ours = oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(**kwargs))
    state, mine = peft.get_peft_model_state_dict(theirs), oxpeft.get_peft_model_state_dict(ours)
    for key in (k for k in state if "magnitude" in k):
        torch.testing.assert_close(mine[key], state[key])
    torch.testing.assert_close(ours.eval()(IDS), _base()(IDS), atol=1e-5, rtol=1e-5)


def test_dora_magnitude_gets_gradients_on_convolutions_and_embeddings():
    model = oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(r=4, target_modules=["conv2d", "emb"], use_dora=True))
    model.train()
    model(IDS).square().mean().backward()
    inner = model.base_model.model
    for layer in (inner.conv2d, inner.emb):
        assert layer.lora_magnitude_vector["default"].weight.grad is not None


IA3_CASES = {
    "output": [],
    "feedforward": ["conv1d", "conv2d", "conv3d", "grouped"],
}


@pytest.mark.parametrize("case", sorted(IA3_CASES))
def test_ia3_on_every_convolution_matches_peft(case, tmp_path):
    # PEFT's (IA)³ has no nn.Conv1d layer, so conv1d is compared through oxpeft's own merge below.
    targets = ["conv2d", "conv3d", "grouped"]
    kwargs = dict(target_modules=targets, feedforward_modules=[m for m in IA3_CASES[case] if m in targets])
    kwargs["init_ia3_weights"] = False
    torch.manual_seed(5)
    theirs = peft.get_peft_model(_base(), peft.IA3Config(**kwargs)).eval()
    ours = oxpeft.get_peft_model(_base(), oxpeft.IA3Config(**kwargs)).eval()
    state = peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in oxpeft.get_peft_model_state_dict(ours).items()} == {
        k: v.shape for k, v in state.items()
    }
    oxpeft.set_peft_model_state_dict(ours, state)
    expected = theirs(IDS)
    torch.testing.assert_close(ours(IDS), expected)
    torch.testing.assert_close(ours.merge_and_unload()(IDS), theirs.merge_and_unload()(IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_conv1d_merges_to_its_forward(feedforward):
    kwargs = dict(target_modules=["conv1d"], feedforward_modules=["conv1d"] if feedforward else [])
    model = oxpeft.get_peft_model(_base(), oxpeft.IA3Config(init_ia3_weights=False, **kwargs)).eval()
    layer = model.base_model.model.conv1d
    assert layer.ia3_l["default"].shape == ((1, 4, 1) if feedforward else (1, 6, 1))
    expected = model(IDS)
    assert not torch.allclose(expected, _base()(IDS))
    torch.testing.assert_close(copy.deepcopy(model).merge_and_unload()(IDS), expected, atol=1e-5, rtol=1e-5)
