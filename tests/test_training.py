"""Training integration: gradient checkpointing in either order, fp32 adapters on a bf16 base."""

from __future__ import annotations

import pytest
import torch

import oxpeft
from conftest import make_llama


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _peft_model():
    torch.manual_seed(0)
    return oxpeft.get_peft_model(
        make_llama(), oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )


@pytest.mark.parametrize("order", ["before-wrapping", "after-wrapping", "on-base-after-wrapping"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_in_any_order(order, reentrant):
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = _grads(_peft_model(), batch)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if order == "before-wrapping":
        base = make_llama()  # reseeds, so the adapters below get the same random init as in _peft_model
        base.gradient_checkpointing_enable(**kwargs)
        model = oxpeft.get_peft_model(
            base, oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    else:
        model = _peft_model()
        target = model if order == "after-wrapping" else model.get_base_model()
        target.gradient_checkpointing_enable(**kwargs)
    assert model.get_base_model().is_gradient_checkpointing
    grads = _grads(model, batch)
    assert set(grads) == set(reference) and len(grads) == 8
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], atol=1e-5, rtol=1e-4)


def test_adapters_stay_fp32_on_a_bf16_base():
    base = make_llama().to(torch.bfloat16)
    model = oxpeft.get_peft_model(base, oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert adapter_dtypes == {torch.float32}
    batch = torch.randint(0, 256, (2, 16))
    out = model(input_ids=batch, labels=batch)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)

    same = oxpeft.get_peft_model(
        make_llama().to(torch.bfloat16), oxpeft.LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False
    )
    assert {p.dtype for n, p in same.named_parameters() if "lora_" in n} == {torch.bfloat16}
