"""`PeftModel` and its task subclasses: the object users train, save, load and merge."""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
from torch import nn

from oxpeft.config import PeftConfig
from oxpeft._ecosystem import warn_unless_peft_is_oxpeft
from oxpeft.mapping import tuner_class_for
from oxpeft.model_card import write_model_card
from oxpeft.utils.other import count_parameters
from oxpeft.utils.peft_types import TaskType, registered_peft_type
from oxpeft.tuner_status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from oxpeft.utils.save_and_load import (
    IncompatibleKeys,
    check_ranks_against_file,
    rename_keys,
    get_peft_model_state_dict,
    load_peft_weights,
    save_peft_weights,
    set_peft_model_state_dict,
)
from oxpeft.tuners.lora.legacy_moe import fuse_per_expert_adapter
from oxpeft.tuners.tuners_utils import BaseTuner, classifier_modules_for, set_requires_grad
from oxpeft.prompt_learning import PromptLearningMixin


class PeftModel(PromptLearningMixin, nn.Module):
    """A base model with one or more adapters.

    Adapter rule (same as HF PEFT, stated once): `add_adapter` and `load_adapter` never change which adapter is
    active; `set_adapter(name)` makes `name` the adapter that runs in forward AND the only one that trains.

    Prompt-learning methods (prompt tuning, P-tuning, prefix tuning) inject nothing: as in HF PEFT, `base_model` is
    then the transformers model itself and the encoders live in `prompt_encoder` (see `PromptLearningMixin`).
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        strict_targets: bool = True,
    ) -> None:
        super().__init__()
        warn_unless_peft_is_oxpeft()
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self._is_prompt_learning = peft_config.is_prompt_learning
        config = self._with_task_heads(peft_config)
        self._input_grad_hook: torch.utils.hooks.RemovableHandle | None = None
        if self._is_prompt_learning:
            self._prompt_init(model, config, adapter_name)
            return
        tuner_cls = self._tuner_class(config)
        self.base_model: BaseTuner = tuner_cls(
            model,
            {adapter_name: config},
            adapter_name,
            strict_targets=strict_targets,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        self._install_input_grad_hook()

    # --- plumbing ------------------------------------------------------------------------------------------------
    def _tuner_class(self, config: PeftConfig) -> type[BaseTuner]:
        """The tuner that injects the first adapter (and, for a plain PeftModel, every later one)."""
        return tuner_class_for(config)

    def _check_adapter_type(self, config: PeftConfig) -> None:
        """Refuse an adapter this model cannot hold beside its others: one method per PeftModel."""
        if config.peft_type != self.peft_type:
            raise ValueError(f"cannot add a {config.peft_type} adapter to a model with {self.peft_type} adapters")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        if self._is_prompt_learning:
            return self._prompt_configs
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        if self._is_prompt_learning:
            return self._prompt_active
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        if self._is_prompt_learning:
            return [self._prompt_active] if self._prompt_configs else []
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        if self._is_prompt_learning:
            return self.base_model
        return self.base_model.model

    def _with_task_heads(self, config: PeftConfig) -> PeftConfig:
        heads = classifier_modules_for(getattr(config, "task_type", None))
        if not heads or not hasattr(config, "modules_to_save"):
            return config
        # In the caller's config, as PEFT does (so `peft_config[name] is config`), each head once.
        existing = list(config.modules_to_save or [])
        config.modules_to_save = existing + [h for h in heads if h not in existing]
        return config

    def _install_input_grad_hook(self) -> None:
        """Make the input embeddings' output require grad while training.

        With a frozen base and gradient checkpointing (reentrant or not, enabled before or after wrapping),
        the checkpointed blocks would otherwise see inputs without grad and the adapters would get none.
        """
        model = self.get_base_model()
        if not hasattr(model, "get_input_embeddings"):
            return
        try:
            embeddings = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return
        if embeddings is None:
            return

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                if not output.requires_grad and output.is_floating_point():
                    output.requires_grad_(True)

        self._input_grad_hook = embeddings.register_forward_hook(hook)

    def _remove_input_grad_hook(self) -> None:
        if self._input_grad_hook is not None:
            self._input_grad_hook.remove()
            self._input_grad_hook = None

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; `adapter_names` (one per sample, "__base__" for none) mixes adapters in one batch."""
        if self._is_prompt_learning:
            self._prompt_refuse_untasked()
        if adapter_names is None:
            return self.get_base_model()(*args, **kwargs)
        with self.base_model.batch_adapters(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self._is_prompt_learning:
            self._prompt_refuse_untasked()
        if adapter_names is None:
            return self.get_base_model().generate(*args, **kwargs)
        with self.base_model.batch_adapters(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    # --- adapters ------------------------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        *,
        strict_targets: bool = True,
    ) -> None:
        """Add a new, inactive adapter (call `set_adapter` to run and train it).

        `autocast_adapter_dtype`: on a float16 / bfloat16 base, keep the new adapter's weights in float32 (stable
        training). `low_cpu_mem_usage`: create the weights on the meta device, uninitialised, for a state dict to
        be assigned to them (`set_peft_model_state_dict`), as PEFT does; the adapter cannot run until then.
        """
        self._check_adapter_type(peft_config)
        if self._is_prompt_learning:
            self._prompt_add(adapter_name, self._with_task_heads(peft_config))
            return
        active = self.active_adapters
        # As PEFT: adding an adapter changes no existing weight's requires_grad (the new one is frozen until
        # `set_adapter`), so weights a user froze or a trainable load unfroze stay as they are.
        before = [(p, p.requires_grad) for p in self.base_model.model.parameters()]
        with self.base_model.adapter_dtype_autocast(autocast_adapter_dtype):
            self.base_model.inject_adapter(
                adapter_name,
                self._with_task_heads(peft_config),
                strict_targets=strict_targets,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        self.base_model.set_adapter(active)
        for param, requires_grad in before:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
        if not peft_config.inference_mode:
            # PEFT's most common multi-adapter surprise: a new trainable adapter that never trains.
            warnings.warn(
                f"adapter '{adapter_name}' is added but not active: forward still runs, and training still "
                f"updates, {active}. Call set_adapter('{adapter_name}') to run and train it.",
                stacklevel=2,
            )

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s); the active ones are the trainable ones (none with `inference_mode`), all others
        are frozen."""
        if self._is_prompt_learning:
            if not isinstance(adapter_name, str):
                raise ValueError("prompt-learning models run one adapter at a time; pass a single adapter name")
            self._prompt_set_adapter(adapter_name)
            if inference_mode:
                self.prompt_encoder[adapter_name].requires_grad_(False)
            return
        self.base_model.set_adapter(adapter_name)
        if inference_mode:
            for name in [adapter_name] if isinstance(adapter_name, str) else adapter_name:
                self.base_model._freeze_adapter(name)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights on or off, active or not (the others are untouched)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded adapters: {sorted(self.peft_config)}")
        if self._is_prompt_learning:
            for name in names:
                self.prompt_encoder[name].requires_grad_(requires_grad)
            return
        set_requires_grad(self.base_model.model, names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if self._is_prompt_learning:
            self._prompt_delete(adapter_name)
            return
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the `with` block."""
        if self._is_prompt_learning:
            with self._prompt_disabled_block():
                yield
            return
        with self.base_model._adapters_disabled():
            yield

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        device_map: Any = None,
        **config_overrides: Any,
    ) -> IncompatibleKeys:
        """Load a saved adapter as `adapter_name` (inactive unless it is the first; see `set_adapter`). If an
        adapter of that name exists, the file's weights replace its weights (as in PEFT).

        With `is_trainable=True` its weights require grad (as in PEFT), though only active adapters run.
        Returns PEFT's load result: `missing_keys` and `unexpected_keys` of this adapter's tensors, both empty,
        since an adapter that does not fit is refused (ValueError naming the tensors, model unchanged). The loading
        options are those of `from_pretrained`.
        """
        config, weights = _read_adapter(
            self.get_base_model(), model_id, None, is_trainable, ephemeral_gpu_offload, device_map, key_mapping,
            torch_device, dict(subfolder=subfolder, revision=revision, token=token), config_overrides,
        )  # fmt: skip
        if adapter_name in self.peft_config:
            # As PEFT (transformers' Trainer resumes a checkpoint this way): the file's tensors replace the existing
            # adapter's, in place, after every key and shape is checked; its config and trainability stay.
            existing = self.peft_config[adapter_name]
            if registered_peft_type(config.peft_type) != registered_peft_type(existing.peft_type):
                raise ValueError(
                    f"adapter '{adapter_name}' is a {existing.peft_type} adapter; {model_id} holds a {config.peft_type} "
                    "one. Load it under another name."
                )
            return _own_load_result(set_peft_model_state_dict(self, weights, adapter_name=adapter_name), adapter_name)
        self.add_adapter(
            adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype, strict_targets=False
        )
        try:
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if is_trainable and not self._is_prompt_learning:
            # As PEFT: a trainable load gives the adapter trainable weights, although it is not active until
            # `set_adapter` (only active adapters get gradients in a forward).
            set_requires_grad(self.base_model.model, adapter_name, True)
        return _own_load_result(result, adapter_name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        torch_device: str | torch.device | None = None,
        device_map: Any = None,
        **config_overrides: Any,
    ) -> "PeftModel":
        """Wrap `model` with the adapter saved in `model_id` (a local directory or a hub repo id).

        If the adapter does not fit the model (wrong shapes, missing or foreign tensors), the model is restored
        and a ValueError names the tensors. `key_mapping` ({regex: replacement}, default the model's
        `_checkpoint_conversion_mapping`) renames the file's tensor keys first, as transformers renames
        checkpoint keys. Adapter weights are created on each base layer's own device, so `device_map` needs nothing
        more; with `low_cpu_mem_usage` they are not created at all but take the file's tensors. A model whose layers
        accelerate offloads to CPU or disk is refused.
        """
        config, weights = _read_adapter(
            model, model_id, config, is_trainable, ephemeral_gpu_offload, device_map, key_mapping, torch_device,
            dict(subfolder=subfolder, revision=revision, token=token), config_overrides,
        )  # fmt: skip
        target_cls = peft_model_class_for(config) if cls is PeftModel else cls
        peft_model = target_cls(
            model,
            config,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            strict_targets=False,
        )
        try:
            set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            peft_model.delete_adapter(adapter_name)
            peft_model._remove_input_grad_hook()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    # --- saving --------------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | Literal["auto"] = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """Write PEFT's files: the `default` adapter in `save_directory`, any other NAME in `save_directory/NAME`.

        With `path_initial_model_for_weight_conversion` (a PiSSA / OLoRA adapter saved right after
        `get_peft_model`, before training), the adapter is saved as a plain LoRA of twice the rank for the
        original, unmodified base model (see `oxpeft.tuners.lora.convert`), as PEFT does; that directory's config
        is rewritten with `init_lora_weights=True` so that loading it never re-runs the initialisation.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded adapters: {sorted(self.peft_config)}")
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            from oxpeft.tuners.lora import convert

            for name in names:
                convert.check_convertible(self.peft_config[name])
            initial = load_peft_weights(path_initial_model_for_weight_conversion)
        if not is_main_process:
            return
        for name in names:
            directory = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            tensors = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            config = self.peft_config[name]
            overrides = dict(kwargs)
            if initial is not None:
                tensors = convert.converted_tensors(tensors, initial, path_initial_model_for_weight_conversion)
                config.save_pretrained(path_initial_model_for_weight_conversion, init_lora_weights=True)
                overrides.update(convert.converted_config_fields(config))
            save_peft_weights(tensors, directory, safe_serialization=safe_serialization)
            if config.task_type is None and config.auto_mapping is None:
                # Without a task type, PEFT records the base class so AutoPeftModel can rebuild it.
                base = self.get_base_model()
                overrides.setdefault(
                    "auto_mapping", {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
                )
            if getattr(config, "init_lora_weights", None) == "loftq":
                # The saved factors are already fitted: loading must not run LoftQ again (PEFT's own practice).
                overrides.setdefault("init_lora_weights", True)
                overrides.setdefault("loftq_config", {})
            config.save_pretrained(directory, inference_mode=True, **overrides)
        self.create_or_update_model_card(os.fspath(save_directory))

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write (or update) `output_dir/README.md`: `library_name: peft`, the base model, tags, versions."""
        write_model_card(
            output_dir,
            self.get_base_model(),
            str(self.active_peft_config.peft_type),
            causal_lm=isinstance(self, PeftModelForCausalLM),
        )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload adapter",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_description: str | None = None,
        **save_kwargs: Any,
    ) -> Any:
        """Save the adapters (`save_pretrained(**save_kwargs)`) into a temporary folder and upload it to the Hub
        repo `repo_id` (created if needed); returns the commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory(prefix="oxpeft-push-") as folder:
            self.save_pretrained(folder, **save_kwargs)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    # --- parameters ----------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters); a quantised weight counts as its unpacked size."""
        return count_parameters(self)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The state of every adapter layer (see `oxpeft.peft_model.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The adapters' state over the whole model (see `oxpeft.peft_model.get_model_status`)."""
        return get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # --- merging -------------------------------------------------------------------------------------------------
    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        *,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge adapters and return the base model; quantised layers come back full precision unless
        `requantize=True`."""
        if self._is_prompt_learning:
            self._prompt_refuse_merge("merge_and_unload")
        self._remove_input_grad_hook()
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names, requantize=requantize)

    def unload(self) -> nn.Module:
        if self._is_prompt_learning:
            self._prompt_refuse_merge("unload")
        self._remove_input_grad_hook()
        return self.base_model.unload()


class PeftModelForCausalLM(PeftModel):
    """A causal language model with adapters."""

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self._is_prompt_learning:
            self._prompt_refuse_batch_adapters(adapter_names)
            return self._prompt_causal_forward(*args, **kwargs)
        return super().forward(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self._is_prompt_learning:
            self._prompt_refuse_batch_adapters(adapter_names)
            return self._prompt_causal_generate(*args, **kwargs)
        return super().generate(*args, adapter_names=adapter_names, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder model with adapters."""

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self._is_prompt_learning:
            self._prompt_refuse_batch_adapters(adapter_names)
            return self._prompt_seq2seq_forward(*args, **kwargs)
        return super().forward(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self._is_prompt_learning:
            self._prompt_refuse_batch_adapters(adapter_names)
            return self._prompt_seq2seq_generate(*args, **kwargs)
        return super().generate(*args, adapter_names=adapter_names, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """A sequence classifier with adapters; the classification head trains and is saved with the adapter."""

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if self._is_prompt_learning:
            self._prompt_refuse_batch_adapters(adapter_names)
            return self._prompt_seq_cls_forward(*args, **kwargs)
        return super().forward(*args, adapter_names=adapter_names, **kwargs)


class PeftModelForTokenClassification(PeftModel):
    """A token classifier with adapters; the classification head trains and is saved with the adapter."""


class PeftModelForQuestionAnswering(PeftModel):
    """An extractive QA model with adapters; the span head trains and is saved with the adapter."""


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder used for embeddings, with adapters."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def peft_model_class_for(config: PeftConfig) -> type[PeftModel]:
    """The PeftModel class of `config.task_type` (PeftModel itself without one)."""
    if config.task_type is None:
        return PeftModel
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TaskType(config.task_type)]


def _own_load_result(result: IncompatibleKeys, adapter_name: str) -> IncompatibleKeys:
    """As PEFT: only the loaded adapter's own tensors count as missing (none, since a missing one is refused)."""
    mine = [k for k in result.missing_keys if f".{adapter_name}." in k or k.endswith(f".{adapter_name}")]
    return IncompatibleKeys(missing_keys=mine, unexpected_keys=result.unexpected_keys)


def _read_adapter(
    model: nn.Module,
    model_id: str | os.PathLike,
    config: PeftConfig | None,
    is_trainable: bool,
    ephemeral_gpu_offload: bool,
    device_map: Any,
    key_mapping: dict[str, str] | None,
    torch_device: str | torch.device | None,
    hub: dict[str, Any],
    config_overrides: dict[str, Any],
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config (read unless given) and the tensors (keys renamed by `key_mapping`) of the adapter in
    `model_id`, for loading into `model`; the loading options are checked first."""
    _check_loading_options(model, device_map)
    if config is None:
        config = PeftConfig.from_pretrained(model_id, **hub, **config_overrides)
    config.inference_mode = not is_trainable
    if hasattr(config, "runtime_config"):
        config.runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
    elif ephemeral_gpu_offload:
        # As PEFT: the option only concerns LoRA's DoRA initialisation.
        warnings.warn(
            f"ephemeral_gpu_offload has no effect on {type(config).__name__} adapters (it concerns LoRA's DoRA "
            "initialisation); ignoring it",
            stacklevel=3,
        )
    weights = load_peft_weights(model_id, device=torch_device, **hub)
    check_ranks_against_file(config, weights, os.fspath(model_id))
    weights = rename_keys(weights, key_mapping, model, config)
    # An adapter saved for transformers 4's per-expert MoE layers, for transformers 5's fused experts.
    return fuse_per_expert_adapter(getattr(model, "get_base_model", lambda: model)(), config, weights)


def _check_loading_options(model: nn.Module, device_map: Any) -> None:
    """Refuse the loading modes oxpeft does not have, by name, before anything is loaded."""
    offloaded = set((getattr(model, "hf_device_map", None) or {}).values()) & {"cpu", "disk"}
    if offloaded and len(set(model.hf_device_map.values())) > 1:
        raise ValueError(
            f"the model is dispatched by accelerate with layers offloaded to {sorted(offloaded)}; oxpeft does not "
            "re-dispatch such a model for an adapter: load the base model without offloading"
        )
