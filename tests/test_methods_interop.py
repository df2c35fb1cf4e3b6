"""IA3, LoHa, LoKr and AdaLoRA adapters move both ways between oxpeft and the real HF PEFT with equal outputs;
merged equals unmerged; a short training run lowers the loss; bad configs get clear errors."""

from __future__ import annotations


import oxpeft
import pytest
import torch
from conftest import MODEL_FACTORIES, assert_saved_like_peft, twin
from torch import nn

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")

ATOL = 1e-5


class TinyConvNet(nn.Module):
    """A small image model with a 3x3 and a 1x1 convolution, for the Conv2d paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6 * 5 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(self.conv3(x).flatten(1))


def make_conv(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


class TinyConv1dNet(nn.Module):
    """A small sequence model with a kernel-3 and a kernel-1 Conv1d, for the Conv1d paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 12, 3, padding=1, bias=False)
        self.conv3 = nn.Conv1d(12, 6, 1)
        self.head = nn.Linear(6 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(self.conv3(x).flatten(1))


def make_conv1d(seed: int = 0) -> TinyConv1dNet:
    torch.manual_seed(seed)
    return TinyConv1dNet().eval()


FACTORIES = dict(MODEL_FACTORIES, conv=make_conv, conv1d=make_conv1d)

# name -> (model kind, config class name (same in both libraries), kwargs)
CASES = {
    "ia3-llama": (
        "llama",
        "IA3Config",
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "ia3-llama-default": ("llama", "IA3Config", dict()),
    "ia3-gpt2-conv1d": (
        "gpt2",
        "IA3Config",
        dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
    ),
    "ia3-bert-seqcls": (
        "bert",
        "IA3Config",
        dict(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"], task_type="SEQ_CLS"
        ),
    ),
    "ia3-conv": ("conv", "IA3Config", dict(target_modules=["conv1", "conv2", "head"], feedforward_modules=["conv2"])),
    "loha-llama": ("llama", "LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "loha-patterns": (
        "llama",
        "LoHaConfig",
        dict(
            r=4, alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 16}
        ),
    ),
    "loha-conv": ("conv", "LoHaConfig", dict(r=3, alpha=6, target_modules=["conv1", "conv2", "conv3", "head"])),
    "loha-conv-effective": (
        "conv",
        "LoHaConfig",
        dict(r=3, target_modules=["conv1", "conv2", "conv3"], use_effective_conv2d=True),
    ),
    "loha-conv1d": ("conv1d", "LoHaConfig", dict(r=2, target_modules=["conv1", "conv2", "conv3"])),
    "loha-conv1d-effective": (
        "conv1d",
        "LoHaConfig",
        dict(r=2, target_modules=["conv1", "conv2", "conv3"], use_effective_conv2d=True),
    ),
    "lokr-llama": ("llama", "LoKrConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])),
    "lokr-decomposed": (
        "llama",
        "LoKrConfig",
        dict(r=2, target_modules=["q_proj", "o_proj", "gate_proj"], decompose_both=True, decompose_factor=4),
    ),
    "lokr-conv": ("conv", "LoKrConfig", dict(r=1, target_modules=["conv1", "conv2", "conv3", "head"])),
    "lokr-conv-effective": (
        "conv",
        "LoKrConfig",
        dict(r=1, target_modules=["conv2"], use_effective_conv2d=True, decompose_factor=2),
    ),
    "lokr-conv1d": ("conv1d", "LoKrConfig", dict(r=1, target_modules=["conv1", "conv2", "conv3"])),
    "lokr-conv1d-full": ("conv1d", "LoKrConfig", dict(r=4, target_modules=["conv1", "conv2"])),
    "adalora-llama": (
        "llama",
        "AdaLoraConfig",
        dict(init_r=6, target_r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], total_step=10),
    ),
    "adalora-conv": (
        "conv",
        "AdaLoraConfig",
        dict(init_r=3, target_r=2, target_modules=["conv1", "conv2", "head"], total_step=10),
    ),
    "adalora-gpt2-conv1d": (
        "gpt2",
        "AdaLoraConfig",
        dict(init_r=4, target_r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, total_step=10),
    ),
}


def model_input(kind: str) -> torch.Tensor:
    torch.manual_seed(99)
    if kind == "conv":
        return torch.randn(2, 4, 5, 5)
    if kind == "conv1d":
        return torch.randn(2, 4, 7)
    return torch.randint(0, 256, (2, 10))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if x.is_floating_point():
            return model(x)
        return model(input_ids=x).logits


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int = 7, scale: float = 0.2) -> None:
    """Move every trainable (adapter) parameter off its identity init, reproducibly and in any framework."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def make_pair(case: str, lib) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    kind, cls_name, kwargs = CASES[case]
    base = FACTORIES[kind]()
    model = lib.get_peft_model(twin(base), getattr(lib, cls_name)(**kwargs))
    perturb_trainable(model)
    model.eval()
    return base, model, model_input(kind)


@pytest.mark.parametrize("case", sorted(CASES))
def test_oxpeft_adapter_loads_in_peft(case, tmp_path):
    base, ours, x = make_pair(case, oxpeft)
    expected = run(ours, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3), "the adapter must change the output"
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    torch.testing.assert_close(run(theirs, x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_oxpeft(case, tmp_path):
    base, theirs, x = make_pair(case, peft)
    expected = run(theirs, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3), "the adapter must change the output"
    theirs.save_pretrained(tmp_path)

    ours = oxpeft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    torch.testing.assert_close(run(ours, x), expected, atol=ATOL, rtol=0)

    # Merging in place and back gives the same outputs; so does merging for good.
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, x), expected, atol=ATOL, rtol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(run(ours, x), expected, atol=ATOL, rtol=1e-5)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, oxpeft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(run(merged, x), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(
    "case", ["ia3-llama", "ia3-gpt2-conv1d", "loha-patterns", "loha-conv-effective", "lokr-decomposed", "adalora-llama"]
)
def test_saved_files_match_peft(case, tmp_path):
    """Same tensor keys and shapes, same config keys and values as HF PEFT writes for the same config."""
    kind, cls_name, kwargs = CASES[case]
    base = FACTORIES[kind]()
    oxpeft.get_peft_model(twin(base), getattr(oxpeft, cls_name)(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(twin(base), getattr(peft, cls_name)(**kwargs)).save_pretrained(tmp_path / "theirs")

    # auto_mapping names the base class's module, which differs for conv.
    assert_saved_like_peft(tmp_path / "ours", tmp_path / "theirs", normalise=lambda config: config.pop("auto_mapping"))


def test_ia3_unmerge_restores_weights():
    base = FACTORIES["gpt2"]()
    model = oxpeft.get_peft_model(twin(base), oxpeft.IA3Config(**CASES["ia3-gpt2-conv1d"][2]))
    perturb_trainable(model)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "ia3_l" not in k}
    model.merge_adapter()
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls_name", ["IA3Config", "LoHaConfig", "LoKrConfig"])
def test_training_lowers_loss(cls_name):
    """(AdaLoRA's training run, with its rank budget, is in test_adalora.py.)"""
    kwargs = {
        "IA3Config": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "LoHaConfig": dict(r=4, target_modules=["q_proj", "v_proj"]),
        "LoKrConfig": dict(r=4, target_modules=["q_proj", "v_proj"]),
    }[cls_name]
    model = oxpeft.get_peft_model(FACTORIES["llama"](), getattr(oxpeft, cls_name)(**kwargs))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    prefix = model.base_model.prefix
    assert trainable and all(prefix in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=0.2 if cls_name == "IA3Config" else 2e-2)
    torch.manual_seed(5)
    batch = torch.randint(0, 256, (2, 12))
    losses = []
    for _ in range(12):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


BAD_CONFIGS = [
    ("IA3Config", dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "subset of target_modules"),
    ("IA3Config", dict(target_modules=["k_proj"], init_ia3_weights="yes"), "init_ia3_weights"),
    ("LoHaConfig", dict(r=0), "r must be a positive integer"),
    ("LoHaConfig", dict(rank_dropout=1.0), "rank_dropout"),
    ("LoHaConfig", dict(init_weights="lycoris"), "init_weights"),
    ("LoKrConfig", dict(decompose_factor=0), "decompose_factor"),
    ("LoKrConfig", dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    ("LoKrConfig", dict(layers_pattern="layers"), "layers_to_transform"),
    ("AdaLoraConfig", dict(init_r=4, target_r=8, total_step=10), "target_r"),
    ("AdaLoraConfig", dict(total_step=10, tinit=6, tfinal=4), "tinit"),
    ("AdaLoraConfig", dict(), "total_step"),
    ("AdaLoraConfig", dict(total_step=10, beta1=1.0), "beta1"),
    ("AdaLoraConfig", dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
    ("AdaLoraConfig", dict(total_step=10, use_dora=True), "use_dora"),
]


@pytest.mark.parametrize("cls_name,kwargs,message", BAD_CONFIGS)
def test_bad_configs_are_refused(cls_name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(oxpeft, cls_name)(**kwargs)


def test_bad_targets_name_the_problem():
    with pytest.raises(ValueError, match="'v_prj' matches no module"):
        oxpeft.get_peft_model(FACTORIES["llama"](), oxpeft.LoHaConfig(target_modules=["q_proj", "v_prj"]))
    with pytest.raises(ValueError, match="feedforward_modules \\['up_proj'\\] match no targeted module"):
        config = oxpeft.IA3Config(target_modules=r".*\.k_proj", feedforward_modules=["up_proj"])
        oxpeft.get_peft_model(FACTORIES["llama"](), config)
    with pytest.raises(ValueError, match="LoKrLayer supports nn.Linear, nn.Conv1d and nn.Conv2d, not Embedding"):
        oxpeft.get_peft_model(FACTORIES["llama"](), oxpeft.LoKrConfig(target_modules=["embed_tokens"]))


def test_per_sample_adapters_are_refused_for_these_methods():
    model = oxpeft.get_peft_model(FACTORIES["llama"](), oxpeft.LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="per-sample adapter_names is not supported by LoHaLayer"):
        model(input_ids=model_input("llama"), adapter_names=["default", "__base__"])


@pytest.mark.parametrize("case", ["ia3-llama", "loha-llama", "lokr-llama"])
def test_several_adapters(case, tmp_path):
    """Adapters of one method coexist: switching, disabling, deleting, and saving a named adapter in its folder."""
    kind, cls_name, kwargs = CASES[case]
    base = FACTORIES[kind]()
    x = model_input(kind)
    model = oxpeft.get_peft_model(twin(base), getattr(oxpeft, cls_name)(**kwargs))
    perturb_trainable(model, seed=1)
    model.add_adapter("other", getattr(oxpeft, cls_name)(**kwargs))
    assert model.active_adapter == "default"
    model.set_adapter("other")
    perturb_trainable(model, seed=2)  # only "other" is trainable now
    model.eval()
    out_other = run(model, x)
    model.set_adapter("default")
    out_default = run(model, x)
    assert not torch.allclose(out_default, out_other, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, x), run(base, x))

    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin(base), str(tmp_path / "other"), adapter_name="other")
    torch.testing.assert_close(run(theirs, x), out_other, atol=ATOL, rtol=0)

    model.delete_adapter("default")
    assert model.active_adapter == "other"
    torch.testing.assert_close(run(model, x), out_other)


def test_ia3_adapters_must_agree_on_feedforward():
    kwargs = CASES["ia3-llama"][2]
    model = oxpeft.get_peft_model(FACTORIES["llama"](), oxpeft.IA3Config(**kwargs))
    with pytest.raises(ValueError, match="is a feed-forward \\(IA\\)³ layer for the existing adapters"):
        model.add_adapter("other", oxpeft.IA3Config(**dict(kwargs, feedforward_modules=[])))
    assert list(model.peft_config) == ["default"]
    assert all(list(m.ia3_l) == ["default"] for m in model.modules() if hasattr(m, "ia3_l"))


def test_loha_training_keeps_only_its_factors_for_backward():
    """The two full-size rank-r products are recomputed in backward, not kept (what HF PEFT's autograd
    function does): the tensors saved for backward are no bigger than PEFT's."""
    base = nn.Sequential(nn.Linear(256, 256))
    x = torch.randn(4, 256)

    def saved_numel(lib) -> int:
        model = lib.get_peft_model(twin(base), lib.LoHaConfig(r=4, target_modules=["0"]))
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss = model(x).square().sum()
        loss.backward()
        assert model.base_model.model[0].hada_w2_b["default"].grad is not None
        return sum(sizes)

    assert saved_numel(oxpeft) <= saved_numel(peft) < 256 * 256


def test_ia3_default_feedforward_needs_no_match():
    """feedforward_modules=None takes the architecture's default, even when it names no targeted module."""
    model = oxpeft.get_peft_model(FACTORIES["llama"](), oxpeft.IA3Config(target_modules=["q_proj"]))
    assert model.peft_config["default"].feedforward_modules == {"down_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.is_feedforward and layer.ia3_l["default"].shape == (64, 1)


def test_ia3_add_weighted_adapter_matches_peft():
    base = FACTORIES["llama"]()
    x = model_input("llama")
    first = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    second = dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    outputs = []
    for lib in (oxpeft, peft):
        model = lib.get_peft_model(twin(base), lib.IA3Config(**first))
        model.add_adapter("second", lib.IA3Config(**second))
        for name in ("default", "second"):
            model.set_adapter(name)
            perturb_trainable(model, seed=len(name))
        model.add_weighted_adapter(["default", "second"], [0.7, -0.4], "mix")
        model.set_adapter("mix")
        model.eval()
        outputs.append(run(model, x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="got 2 adapters but 1 weights"):
        model_ours = oxpeft.get_peft_model(twin(base), oxpeft.IA3Config(**first))
        model_ours.add_weighted_adapter(["default", "default"], [1.0], "bad")


def _dequantized_twin(model: nn.Module) -> nn.Module:
    """A dense copy whose Linear layers hold exactly the dequantised weights."""
    from oxpeft import Linear4bit, Linear8bit

    dense = twin(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, (Linear4bit, Linear8bit)):
            parent_name, _, child = name.rpartition(".")
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize().float()
            setattr(dense.get_submodule(parent_name), child, linear)
    return dense


@pytest.mark.parametrize("case", ["ia3-llama", "adalora-llama"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_equals_dequantized_base(case, bits):
    """(IA)³ and AdaLoRA on oxpeft's Linear4bit / Linear8bit compute what they compute on the dequantised weights;
    merge_and_unload gives full-precision layers with the same outputs."""
    from oxpeft import Linear4bit, Linear8bit, QuantizationConfig, quantize_model

    _, cls_name, kwargs = CASES[case]
    # 8-bit with threshold 0: every column in float against the dequantised weight, like the dense twin.
    flag = {"load_in_4bit": True} if bits == 4 else {"load_in_8bit": True, "llm_int8_threshold": 0.0}
    quantized = quantize_model(FACTORIES["llama"](), QuantizationConfig(bnb_4bit_compute_dtype=torch.float32, **flag))
    dense = _dequantized_twin(quantized)
    x = model_input("llama")
    models = []
    for base in (quantized, dense):
        torch.manual_seed(0)  # the same initial adapter weights for both
        models.append(oxpeft.get_peft_model(twin(base), getattr(oxpeft, cls_name)(**kwargs)))
    for model in models:
        perturb_trainable(model)
        model.eval()
    outputs = [run(model, x) for model in models]
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=1e-5)

    layer = models[0].base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, Linear4bit if bits == 4 else Linear8bit)
    merged = models[0].merge_and_unload()
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(run(merged, x), outputs[0], atol=ATOL, rtol=1e-5)


def test_loha_hadamard_gradients_are_exact():
    from oxpeft.tuners.loha.layer import HadamardProduct

    gen = torch.Generator().manual_seed(0)
    factors = [
        torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
        for shape in [(5, 3), (3, 7), (5, 3), (3, 7)]
    ]
    assert torch.autograd.gradcheck(HadamardProduct.apply, factors)


def test_lokr_conv1d_effective_merges():
    """LoKr with a CP-form Conv1d w2 (HF PEFT 0.21.2 itself fails on this layout in torch.kron, so there is no
    oracle): merged equals unmerged, and a saved adapter reloads."""
    base = FACTORIES["conv1d"]()
    x = model_input("conv1d")
    config = dict(r=1, target_modules=["conv2"], use_effective_conv2d=True, decompose_factor=2)
    model = oxpeft.get_peft_model(twin(base), oxpeft.LoKrConfig(**config))
    perturb_trainable(model)
    model.eval()
    assert "default" in model.base_model.model.conv2.lokr_t2
    expected = run(model, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3)
    model.merge_adapter()
    torch.testing.assert_close(run(model, x), expected, atol=ATOL, rtol=1e-5)
