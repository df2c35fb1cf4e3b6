"""oxpeft.merge_checkpoint / unmerge_checkpoint of adapters on convolutions against HF PEFT's merge_and_unload.

A convolution's kernel (out, in, *kernel) is merged as its (out, in * kernel size) view: LoRA's A is a kernel like
W's and B a 1x1 kernel, DoRA's norm runs over each output channel's kernel, LoHa / LoKr factors are flattened the
same way, IA3 scales output channels (or, feedforward, input channels). The adapters are made by the real PEFT on
a small network with Conv1d, Conv2d and Conv3d layers, their parameters perturbed; the oracle is PEFT's
merge_and_unload of the same adapter file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import oxpeft

peft = pytest.importorskip("peft")
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_checkpoint_merge import compare, read_checkpoint, sha_per_tensor  # noqa: E402

CONVS = ["c1", "c2", "c3"]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(6, 10, 3)
        self.c2 = torch.nn.Conv2d(4, 8, (3, 2))
        self.c3 = torch.nn.Conv3d(3, 4, 2)
        self.grouped = torch.nn.Conv2d(4, 8, 3, groups=2)
        self.point = torch.nn.Conv2d(8, 6, 1)
        self.lin = torch.nn.Linear(8, 8)
        self.emb = torch.nn.Embedding(30, 8)


def base_checkpoint(root: Path, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    net = Net().to(dtype)
    folder = root / f"base-{str(dtype)[6:]}"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    return folder


def make_adapter(path: Path, config, seed: int = 1) -> Path:
    """A real PEFT adapter on Net, its parameters perturbed (their init is an identity or a zero delta)."""
    torch.manual_seed(seed)
    pm = get_peft_model(Net(), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            elif any(k in name for k in ("lora_", "hada_", "lokr_")):
                p.normal_(0, 0.15)
    pm.save_pretrained(path)
    return path


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype) -> torch.nn.Module:
    net = Net().to(dtype)
    net.load_state_dict(read_checkpoint(base))
    return PeftModel.from_pretrained(net, adapter).merge_and_unload()


CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=CONVS + ["point", "lin"]),
    "lora-bias-rslora": lambda: LoraConfig(
        r=4, lora_alpha=6, use_rslora=True, lora_bias=True, target_modules=CONVS, rank_pattern={"c2": 2}
    ),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=CONVS + ["point", "lin"]),
    # PEFT's LoHa and LoKr have no Conv3d layer.
    # An embedding's DoRA magnitude scales the table's columns, each norm taken over the whole vocabulary.
    "dora-embedding": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["emb", "c2"]),
    "loha": lambda: LoHaConfig(r=3, alpha=6, target_modules=["c1", "c2", "point"]),
    "lokr": lambda: LoKrConfig(r=2, alpha=4, target_modules=["c1", "c2", "point"]),
    "lokr-full": lambda: LoKrConfig(r=16, alpha=4, target_modules=["c2", "lin"]),
    # PEFT's IA3 has no Conv1d layer.
    "ia3": lambda: IA3Config(target_modules=["c2", "c3", "point"], feedforward_modules=["c2", "point"]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_convolution_adapters_merge_like_peft_and_unmerge_exactly(tmp_path, method, dtype):
    base = base_checkpoint(tmp_path, dtype)
    adapter = make_adapter(tmp_path / "adapter", CONFIGS[method]())
    out = tmp_path / "merged"
    report = oxpeft.merge_checkpoint(base, adapter, out, progress=False)
    assert report.tensors_changed > 0
    ours, oracle, orig = read_checkpoint(out), peft_merged(base, adapter, dtype), read_checkpoint(base)
    if dtype == torch.float32:
        # PEFT computes a kernel's delta with a convolution, in its own summation order.
        for key, value in oracle.state_dict().items():
            torch.testing.assert_close(ours[key], value, rtol=2e-6, atol=1e-6, msg=key)
    else:
        compare(ours, oracle, max_ulp=1, scale=orig)

    back = tmp_path / "back"
    assert oxpeft.unmerge_checkpoint(out, adapter, back, progress=False).exact
    assert sha_per_tensor(back) == sha_per_tensor(base)


def test_every_convolution_kind_is_changed(tmp_path):
    base = base_checkpoint(tmp_path, torch.float32)
    adapter = make_adapter(tmp_path / "adapter", CONFIGS["dora"]())
    oxpeft.merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    ours, orig = read_checkpoint(tmp_path / "merged"), read_checkpoint(base)
    changed = {k for k in ours if not torch.equal(ours[k], orig[k])}
    assert changed == {"c1.weight", "c2.weight", "c3.weight", "point.weight", "lin.weight"}


@pytest.mark.parametrize(
    "config, match",
    [
        (lambda: LoraConfig(r=4, target_modules=["grouped"]), r"grouped convolution \(groups=2\).*cannot be merged"),
        (lambda: LoHaConfig(r=2, alpha=2, target_modules=["c2"], use_effective_conv2d=True), "use_effective_conv2d"),
        (lambda: LoKrConfig(r=16, alpha=2, target_modules=["c1"]), "full Conv1d Kronecker factor"),
    ],
)
def test_what_cannot_be_merged_is_refused_before_writing(tmp_path, config, match):
    base = base_checkpoint(tmp_path, torch.float32)
    adapter = make_adapter(tmp_path / "adapter", config())
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ValueError, match=match):
        oxpeft.merge_checkpoint(base, adapter, work / "out", progress=False)
    assert list(work.iterdir()) == []


def test_a_kernel_of_another_shape_is_refused(tmp_path):
    base = base_checkpoint(tmp_path, torch.float32)
    adapter = make_adapter(tmp_path / "adapter", LoraConfig(r=4, target_modules=["c2"]))
    state_path = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(state_path)
    key = "base_model.model.c2.lora_A.weight"
    state[key] = state[key].reshape(4, 4, 2, 3).contiguous()  # same size, the kernel's sides swapped
    save_file(state, state_path)
    with pytest.raises(ValueError, match=r"lora_A must have W's kernel"):
        oxpeft.merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
