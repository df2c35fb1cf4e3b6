"""The quantised modules on a CUDA device: the torch-op path against the Rust path and bitsandbytes' CUDA kernels.

These need a GPU and are skipped without one (the CPU tests run the same torch-op code on CPU, by forcing
it, and compare it with the Rust path). Run them where a device exists, e.g. through benches/device_check.sh.
"""

from __future__ import annotations

import pytest
import torch

import oxpeft
from oxpeft.quant import functional as F
from conftest import make_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(64, 64), (257, 129), (1024, 4096)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_cuda_quantise_and_dequantise_equal_the_cpu_bytes(shape, dtype, quant_type, double):
    w = _weight(shape, dtype)
    cpu_packed, cpu_state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
    gpu_packed, gpu_state = F.quantize_4bit(w.cuda(), blocksize=64, quant_type=quant_type, compress_statistics=double)
    assert torch.equal(gpu_packed.cpu(), cpu_packed)
    torch.testing.assert_close(gpu_state.block_scales().cpu(), cpu_state.block_scales(), rtol=0, atol=0)
    out_cpu = F.dequantize_4bit(cpu_packed, cpu_state, dtype=dtype)
    out_gpu = F.dequantize_4bit(cpu_packed.cuda(), cpu_state.to("cuda"), dtype=dtype)
    assert torch.equal(out_gpu.cpu(), out_cpu)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_bytes_equal_bitsandbytes_cuda(shape, quant_type):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = _weight(shape, torch.bfloat16).cuda()
    ours, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    theirs, their_state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(ours.flatten().cpu(), theirs.flatten().cpu())
    torch.testing.assert_close(state.absmax.cpu(), their_state.absmax.cpu(), rtol=0, atol=0)
    back = bnb_f.dequantize_4bit(ours.reshape(theirs.shape), their_state)
    assert torch.equal(F.dequantize_4bit(ours, state, dtype=torch.bfloat16).cpu(), back.cpu())


@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_module_forward_and_backward_equal_cpu(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192, bias=True)
    cls = oxpeft.Linear4bit if bits == 4 else oxpeft.Linear8bit
    module = cls.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(3, 7, 256)
    xs = [x.clone().requires_grad_(True), x.cuda().requires_grad_(True)]
    outs = [module(xs[0]), module.to("cuda")(xs[1])]
    torch.testing.assert_close(outs[1].cpu(), outs[0], atol=1e-4, rtol=1e-4)
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(xs[1].grad.cpu(), xs[0].grad, atol=1e-4, rtol=1e-4)


def test_cuda_qlora_training_lowers_the_loss():
    model = oxpeft.quantize_model(make_llama(), oxpeft.QuantizationConfig(load_in_4bit=True)).to("cuda")
    model = oxpeft.get_peft_model(model, oxpeft.LoraConfig(r=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)).cuda()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
