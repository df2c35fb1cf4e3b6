"""transformers' Trainer trains oxpeft models, checkpoints adapters in PEFT format, and resumes exactly."""

from __future__ import annotations

import os

import pytest
import torch

import oxpeft
from conftest import make_llama
from oxpeft.trainer import PeftTrainer

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for the checkpoint format")


def _dataset(n: int = 24):
    # a few sequences seen again and again: something the adapter can learn within a few steps
    gen = torch.Generator().manual_seed(0)
    distinct = [torch.randint(0, 256, (16,), generator=gen) for _ in range(4)]
    return [{"input_ids": distinct[i % 4], "labels": distinct[i % 4].clone()} for i in range(n)]


def _trainer(output_dir, max_steps=8):
    from transformers import TrainingArguments

    torch.manual_seed(0)
    model = oxpeft.get_peft_model(
        make_llama(), oxpeft.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"])
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return PeftTrainer(model=model, args=args, train_dataset=_dataset())


def _adapter(model):
    return {k: v.clone() for k, v in oxpeft.get_peft_model_state_dict(model).items()}


def test_trainer_trains_checkpoints_in_peft_format_and_resumes_exactly(tmp_path):
    trainer = _trainer(tmp_path / "run")
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5
    final = _adapter(trainer.model)

    ckpt = tmp_path / "run" / "checkpoint-4"
    assert sorted(p for p in os.listdir(ckpt) if p.startswith("adapter_")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not (ckpt / "model.safetensors").exists()
    # the checkpoint is a PEFT adapter
    loaded = peft.PeftModel.from_pretrained(make_llama(), str(ckpt))
    assert loaded.peft_config["default"].r == 4

    resumed = _trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(ckpt))
    for key, value in _adapter(resumed.model).items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=1e-5)
    assert result.global_step == 8
