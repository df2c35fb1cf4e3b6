"""transformers' plain Trainer with default TrainingArguments (no remove_unused_columns=False). Usage:
trainer.py OUT {straight|resume|best}.

`straight` trains 4 steps and saves a checkpoint every 2; `resume` stops the same run after 2 steps, then a new
Trainer resumes from checkpoint-2 to step 4; both save OUT/adapter (the final adapter) for the test to compare. `best` evaluates every
step and keeps the best checkpoint (`load_best_model_at_end`)."""

import os

import torch
from tiny import args, files, logits, report, tiny_llama, token_dataset, which_peft

import peft
from transformers import Trainer, TrainerCallback, TrainingArguments

out, mode = args()


class StopAt(TrainerCallback):
    """Interrupts a run after `step` steps, as a crash or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def make_trainer(max_steps: int, callbacks=(), **overrides):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    options = dict(
        per_device_train_batch_size=4, max_steps=max_steps, save_steps=2, report_to=[], use_cpu=True,
        learning_rate=1e-2, logging_steps=1, seed=0,
    )  # fmt: skip
    config = TrainingArguments(os.path.join(out, "run"), **{**options, **overrides})
    data = token_dataset()
    return Trainer(
        model=model, args=config, train_dataset=data, eval_dataset=data.select(range(4)), callbacks=list(callbacks)
    )


if mode == "straight":
    trainer = make_trainer(4)
    trainer.train()
elif mode == "resume":
    make_trainer(4, callbacks=[StopAt(2)]).train()
    trainer = make_trainer(4)
    trainer.train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))
else:
    trainer = make_trainer(4, eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                           metric_for_best_model="eval_loss", save_total_limit=2)  # fmt: skip
    trainer.train()
trainer.model.save_pretrained(os.path.join(out, "adapter"))
report(
    os.path.join(out, "result.json"),
    peft=which_peft(),
    checkpoints=files(os.path.join(out, "run")),
    losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
    best=trainer.state.best_model_checkpoint,
    best_metric=trainer.state.best_metric,
    eval_losses={h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h},
    signature_columns=trainer._signature_columns,
)
torch.save(logits(trainer.model), os.path.join(out, "logits.pt"))
