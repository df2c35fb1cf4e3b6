"""`PeftTrainer`: transformers' Trainer, saving and resuming oxpeft adapters in HF PEFT's format.

transformers' Trainer only recognises HF PEFT's own PeftModel class; given any other nn.Module it saves
the full state dict (base weights included) at every checkpoint. This subclass writes just the adapters
(`adapter_config.json` + `adapter_model.safetensors`, other adapters in sub-folders, exactly what
`save_pretrained` writes) and reads them back on `resume_from_checkpoint` and `load_best_model_at_end`.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import Trainer

from oxpeft.peft_model import PeftModel
from oxpeft.utils.save_and_load import load_peft_weights, set_peft_model_state_dict

TRAINING_ARGS_NAME = "training_args.bin"


class PeftTrainer(Trainer):
    """A `transformers.Trainer` whose checkpoints of an oxpeft model are PEFT adapter folders."""

    def _peft_model(self, model: torch.nn.Module | None = None) -> PeftModel | None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        return unwrapped if isinstance(unwrapped, PeftModel) else None

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the dataset columns the BASE model's forward accepts (PeftModel.forward takes **kwargs).
        model = self._peft_model()
        if self._signature_columns is None and model is not None:
            columns = list(inspect.signature(model.get_base_model().forward).parameters)
            self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peft_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        peft_model = self._peft_model(model)
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in peft_model.peft_config:
            folder = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            weights = load_peft_weights(folder, device=next(peft_model.parameters()).device)
            set_peft_model_state_dict(peft_model, weights, adapter_name=name)
        return None

    def _load_best_model(self) -> None:
        if self._peft_model() is None:
            return super()._load_best_model()
        return self._load_from_checkpoint(self.state.best_model_checkpoint)
