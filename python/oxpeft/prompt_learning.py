"""Prompt learning on a `PeftModel`: adapter state, forward for each task, and generate().

As in HF PEFT, a prompt-learning `PeftModel` keeps the untouched transformers model as `base_model` and the
encoders in a `prompt_encoder` ModuleDict keyed by adapter name, so whole-model state dicts carry PEFT's names.
Virtual tokens enter the model in one of two ways:

- prompt tuning and P-tuning prepend `num_virtual_tokens` embeddings to the input embeddings (to the encoder's
  input for seq2seq models), with the attention mask and the labels extended to match;
- prefix tuning hands the model a KV cache (transformers' `DynamicCache`, or `EncoderDecoderCache` for
  encoder-decoder models) that already holds `num_virtual_tokens` keys and values in every layer.

`generate()` wraps the model's `prepare_inputs_for_generation` for the duration of the call: the virtual tokens are
injected once, at the prefill step, and every later step only extends the attention mask.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from oxpeft._io import check_adapter_name
from oxpeft.utils.peft_types import PEFT_TYPE_TO_TUNER_MAPPING, PeftType, TaskType
from oxpeft.tuners.tuners_utils import ListMatcher, ModulesToSaveWrapper, _closest_names, classifier_modules_for
from oxpeft.config import PROMPT_LEARNING_TASKS, PromptLearningConfig
from oxpeft.tuners.prompt_learning_utils import VirtualTokenEncoder

PREFIX_METHODS = (PeftType.PREFIX_TUNING,)


class PromptLearningMixin:
    """The prompt-learning half of `PeftModel`; every method here assumes `self._is_prompt_learning`."""

    base_model: nn.Module
    prompt_encoder: nn.ModuleDict
    _prompt_configs: dict[str, PromptLearningConfig]
    _prompt_active: str
    _prompt_disabled: bool

    # --- adapters --------------------------------------------------------------------------------------------------
    def _prompt_init(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> None:
        task = TaskType(config.task_type) if config.task_type is not None else None
        if task not in PROMPT_LEARNING_TASKS:
            allowed = ", ".join(t.value for t in PROMPT_LEARNING_TASKS)
            raise ValueError(
                f"{config.peft_type} needs task_type set to one of {allowed} (it decides where the virtual tokens "
                f"go); got {config.task_type!r}"
            )
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()
        self._prompt_configs = {}
        self._prompt_active = adapter_name
        self._prompt_disabled = False
        flags = [(param, param.requires_grad) for param in model.parameters()]
        for param, _ in flags:
            param.requires_grad_(False)
        try:
            self._prompt_add(adapter_name, config)
        except BaseException:
            for param, flag in flags:
                param.requires_grad_(flag)
            raise

    def _prompt_add(self, adapter_name: str, config: PromptLearningConfig) -> None:
        """Create adapter `adapter_name`'s encoder; nothing changes if the config does not fit the model."""
        if adapter_name in self._prompt_configs:
            raise ValueError(f"an adapter named '{adapter_name}' already exists; delete it first or pick another name")
        check_adapter_name(adapter_name)
        known_task = next(iter(self._prompt_configs.values()), config).task_type
        if config.task_type != known_task:
            raise ValueError(f"cannot add a {config.task_type} adapter to a model with {known_task} adapters")
        config = copy.copy(config)
        config.fill_from_model(getattr(self.base_model, "config", None))
        if config.peft_type in PREFIX_METHODS:
            self._prompt_check_prefix_support()
        encoder = _build_encoder(config, self._prompt_word_embeddings(required=False))
        reference = next(self.base_model.parameters(), None)
        if reference is not None:
            encoder.to(reference.device)
        save_keys = self._prompt_modules_to_save_keys(config)

        self.prompt_encoder[adapter_name] = encoder
        self._prompt_configs[adapter_name] = config
        for key in save_keys:
            target = self.base_model.get_submodule(key)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
            else:
                parent_name, _, child = key.rpartition(".")
                parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
                setattr(parent, child, ModulesToSaveWrapper(target, adapter_name))
        self._prompt_set_adapter(self._prompt_active)

    def _prompt_modules_to_save_keys(self, config: PromptLearningConfig) -> list[str]:
        entries = list(config.modules_to_save or [])
        if not entries:
            return []
        names: list[str] = []
        inside: list[str] = []
        for name, module in self.base_model.named_modules():
            if not name or any(name.startswith(p) for p in inside):
                continue
            names.append(name)
            if isinstance(module, ModulesToSaveWrapper):
                inside.append(name + ".")
        heads = classifier_modules_for(config.task_type)
        matcher = ListMatcher(entries)
        missing = [e for e in matcher.unmatched(names) if e not in heads]
        if missing:
            detail = "; ".join(f"{e!r} (closest: {_closest_names(e, names)})" for e in missing[:5])
            raise ValueError(f"modules_to_save entries match no module: {detail}")
        return [n for n in names if matcher.matches(n)]

    def _prompt_check_prefix_support(self) -> None:
        if any(getattr(m, "gradient_checkpointing", False) for m in self.base_model.modules()):
            raise ValueError(
                "prefix tuning feeds its prefix through the KV cache, which gradient checkpointing disables; "
                "turn gradient checkpointing off or use prompt tuning / P-tuning"
            )
        _cache_kwarg(self.base_model)  # raises if the model takes no cache

    def _prompt_set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter and the only trainable one (unless it is in inference mode)."""
        if adapter_name not in self._prompt_configs:
            raise ValueError(f"unknown adapter '{adapter_name}'; loaded adapters: {sorted(self._prompt_configs)}")
        self._prompt_active = adapter_name
        trainable = not self._prompt_configs[adapter_name].inference_mode
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and name == adapter_name)
        for wrapper in self._prompt_wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.set_adapter(adapter_name)
                wrapper.modules_to_save[adapter_name].requires_grad_(trainable)

    def _prompt_delete(self, adapter_name: str) -> None:
        if adapter_name not in self._prompt_configs:
            raise ValueError(f"Adapter {adapter_name} does not exist; loaded adapters: {sorted(self._prompt_configs)}")
        del self.prompt_encoder[adapter_name]
        del self._prompt_configs[adapter_name]
        for key, wrapper in list(self._prompt_named_wrappers()):
            wrapper.delete_adapter(adapter_name)
            if len(wrapper.modules_to_save) == 0:
                parent_name, _, child = key.rpartition(".")
                parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
                setattr(parent, child, wrapper.original_module)
        if self._prompt_configs and adapter_name == self._prompt_active:
            self._prompt_set_adapter(next(iter(self._prompt_configs)))

    def _prompt_named_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _prompt_wrappers(self) -> list[ModulesToSaveWrapper]:
        return [w for _, w in self._prompt_named_wrappers()]

    def _prompt_refuse_batch_adapters(self, adapter_names: list[str] | None) -> None:
        if adapter_names is not None:
            raise ValueError("per-sample adapter_names are not supported with prompt learning; use set_adapter")

    def _prompt_refuse_merge(self, operation: str) -> None:
        raise ValueError(
            f"{operation}() does not apply to {self.peft_type} adapters: virtual tokens cannot be merged into "
            "weights; use get_base_model() for the model without them"
        )

    def _prompt_refuse_untasked(self) -> None:
        raise TypeError(
            "a prompt-learning adapter needs the PeftModel class of its task (PeftModelForCausalLM, ...) to place "
            "its virtual tokens; create it with get_peft_model or PeftModel.from_pretrained"
        )

    @contextmanager
    def _prompt_disabled_block(self) -> Iterator[None]:
        was = self._prompt_disabled
        wrappers = self._prompt_wrappers()
        self._prompt_disabled = True
        for wrapper in wrappers:
            wrapper.enable_adapters(False)
        try:
            yield
        finally:
            self._prompt_disabled = was
            for wrapper in wrappers:
                wrapper.enable_adapters(not was)

    # --- saving / loading ------------------------------------------------------------------------------------------
    def _prompt_encoder_for(self, adapter_name: str) -> VirtualTokenEncoder:
        return self.prompt_encoder[adapter_name]  # type: ignore[return-value]

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """PEFT's `prompt_embeddings`: the encoder's output for every virtual token (prefix: the first
        num_virtual_tokens)."""
        config = self._prompt_configs[adapter_name]
        rows = config.num_virtual_tokens if config.peft_type in PREFIX_METHODS else config.total_virtual_tokens
        with torch.no_grad():
            return self._prompt_encoder_for(adapter_name).output(rows).detach().cpu()

    # --- virtual tokens --------------------------------------------------------------------------------------------
    def _prompt_word_embeddings(self, required: bool = True) -> nn.Module | None:
        getter = getattr(self.base_model, "get_input_embeddings", None)
        embeddings = None
        if callable(getter):
            try:
                embeddings = getter()
            except (AttributeError, NotImplementedError):
                embeddings = None
        if embeddings is None and required:
            raise ValueError(f"{type(self.base_model).__name__} has no get_input_embeddings(); prompt tuning needs it")
        return embeddings

    def get_prompt(self, batch_size: int) -> Any:
        """The active adapter's virtual tokens: embeddings (batch, tokens, dim), or a prefix KV cache."""
        config = self._prompt_configs[self._prompt_active]
        if config.peft_type in PREFIX_METHODS:
            return self._prompt_prefix_cache(batch_size)
        return self._prompt_embeddings(batch_size)

    def _prompt_embeddings(self, batch_size: int) -> torch.Tensor:
        config = self._prompt_configs[self._prompt_active]
        prompts = self._prompt_encoder_for(self._prompt_active).output(config.total_virtual_tokens)
        return prompts.unsqueeze(0).expand(batch_size, -1, -1)

    def _prompt_prefix_cache(self, batch_size: int) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        config = self._prompt_configs[self._prompt_active]
        flat = self._prompt_encoder_for(self._prompt_active).output(config.num_virtual_tokens)
        dtype = getattr(self.base_model, "dtype", None)
        if dtype is not None:
            flat = flat.to(dtype)
        n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        # (tokens, layers * 2 * dim) -> rows of (heads, tokens, head_dim): row 2i is layer i's keys, 2i+1 its values.
        rows = flat.view(n, 2 * layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)
        rows = rows.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        # PEFT lays an encoder-decoder prefix out as the prefix twice over, read four rows (self k, self v, cross k,
        # cross v) per layer, and then drops the cross-attention pair. Decoder layer i thus reads rows 4i and 4i+1
        # (mod 2 * layers); reading the same rows keeps saved prefixes interchangeable with PEFT.
        stride = 2 * config.num_transformer_submodules
        pairs = [
            (rows[(stride * i) % (2 * layers)].contiguous(), rows[(stride * i + 1) % (2 * layers)].contiguous())
            for i in range(layers)
        ]
        if config.num_transformer_submodules == 2:
            # The cross-attention cache starts empty: the encoder has no prefix, so it is computed as usual.
            return EncoderDecoderCache(DynamicCache(pairs), DynamicCache())
        return DynamicCache(pairs)

    def _prompt_adjust_kwargs(
        self, config: PromptLearningConfig, kwargs: dict[str, Any], *, keep_token_type_ids: bool, warn: bool = True
    ) -> None:
        """position_ids shift past a prefix (and are dropped for prepended prompts); token_type_ids grow or go.

        `warn=False` inside generate(), which makes position_ids itself: with prepended prompts the model then
        numbers positions from the cache, exactly as in forward.
        """
        if kwargs.get("position_ids") is not None:
            if config.peft_type in PREFIX_METHODS:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                if warn:
                    warnings.warn("position_ids are ignored with prompt tuning / P-tuning", stacklevel=4)
                kwargs["position_ids"] = None
        token_types = kwargs.get("token_type_ids")
        if token_types is None:
            return
        if not keep_token_type_ids:
            warnings.warn("token_type_ids are ignored with prompt learning for this task", stacklevel=4)
            kwargs["token_type_ids"] = None
        elif config.peft_type not in PREFIX_METHODS:
            kwargs["token_type_ids"] = _prepend(token_types, config.num_virtual_tokens, 0)

    # --- forward ---------------------------------------------------------------------------------------------------
    def _prompt_causal_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        base = self.base_model
        if self._prompt_disabled:
            return base(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs
            )
        config = self._prompt_configs[self._prompt_active]
        n = config.num_virtual_tokens
        batch_size = _batch_size(input_ids, inputs_embeds)
        attention_mask = _prepend(attention_mask, n, 1)
        self._prompt_adjust_kwargs(config, kwargs, keep_token_type_ids=False)
        if config.peft_type in PREFIX_METHODS:
            kwargs[_cache_kwarg(base)] = self._prompt_prefix_cache(batch_size)
            return base(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
            )
        inputs_embeds = self._prompt_prepend_embeddings(input_ids, inputs_embeds, batch_size)
        if labels is not None:
            labels = _prepend(labels, n, -100)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _prompt_seq_cls_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        base = self.base_model
        if self._prompt_disabled:
            return base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        config = self._prompt_configs[self._prompt_active]
        batch_size = _batch_size(input_ids, inputs_embeds)
        attention_mask = _prepend(attention_mask, config.num_virtual_tokens, 1)
        self._prompt_adjust_kwargs(config, kwargs, keep_token_type_ids=True)
        if config.peft_type in PREFIX_METHODS:
            kwargs[_cache_kwarg(base)] = self._prompt_prefix_cache(batch_size)
            return base(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        inputs_embeds = self._prompt_prepend_embeddings(input_ids, inputs_embeds, batch_size)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def _prompt_seq2seq_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        base = self.base_model
        if self._prompt_disabled:
            return base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                decoder_attention_mask=decoder_attention_mask,
                **kwargs,
            )
        config = self._prompt_configs[self._prompt_active]
        n = config.num_virtual_tokens
        batch_size = _batch_size(input_ids, inputs_embeds)
        self._prompt_adjust_kwargs(config, kwargs, keep_token_type_ids=False)
        if config.peft_type in PREFIX_METHODS:
            # The prefix lives in the decoder's self-attention; the encoder sees the input unchanged.
            kwargs[_cache_kwarg(base)] = self._prompt_prefix_cache(batch_size)
            return base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                decoder_attention_mask=_prepend(decoder_attention_mask, n, 1),
                **kwargs,
            )
        # Only the first block of virtual tokens is used: PEFT sizes the embedding for two submodules but feeds the
        # encoder alone.
        inputs_embeds = self._prompt_prepend_embeddings(input_ids, inputs_embeds, batch_size, rows=n)
        return base(
            inputs_embeds=inputs_embeds,
            attention_mask=_prepend(attention_mask, n, 1),
            decoder_attention_mask=decoder_attention_mask,
            **kwargs,
        )

    def _prompt_prepend_embeddings(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        batch_size: int,
        rows: int | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self._prompt_word_embeddings()(input_ids)
        prompts = self._prompt_embeddings(batch_size)
        if rows is not None:
            prompts = prompts[:, :rows]
        return torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)

    # --- generate --------------------------------------------------------------------------------------------------
    def _prompt_causal_generate(self, *args: Any, **kwargs: Any) -> Any:
        base = self.base_model
        if self._prompt_disabled:
            return base.generate(*args, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate() with prompt learning takes input_ids, not inputs_embeds")
        config = self._prompt_configs[self._prompt_active]
        n = config.num_virtual_tokens
        cache_key = _cache_kwarg(base)

        def inject(original: Callable[..., dict], input_ids: torch.Tensor, *a: Any, **kw: Any) -> dict:
            prefill = _is_prefill(kw)
            inputs = original(input_ids, *a, **kw)
            inputs["attention_mask"] = _prepend_2d_mask(inputs.get("attention_mask"), n)
            self._prompt_adjust_kwargs(config, inputs, keep_token_type_ids=False, warn=False)
            if not prefill:
                return inputs
            ids = inputs["input_ids"]
            if config.peft_type in PREFIX_METHODS:
                inputs.pop("past_key_values", None)
                inputs[cache_key] = self._prompt_prefix_cache(ids.shape[0])
            else:
                inputs["inputs_embeds"] = self._prompt_prepend_embeddings(ids, None, ids.shape[0])
                inputs["input_ids"] = None
            return inputs

        with _wrapped_prepare_inputs(base, inject):
            return base.generate(*args, **kwargs)

    def _prompt_seq2seq_generate(self, *args: Any, **kwargs: Any) -> Any:
        base = self.base_model
        if self._prompt_disabled:
            return base.generate(*args, **kwargs)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise TypeError("generate() takes the input ids once, as the only positional argument or input_ids=")
            kwargs["input_ids"] = args[0]
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate() with prompt learning needs input_ids")
        config = self._prompt_configs[self._prompt_active]
        n = config.num_virtual_tokens
        self._prompt_adjust_kwargs(config, kwargs, keep_token_type_ids=False)
        if config.peft_type not in PREFIX_METHODS:
            if kwargs.pop("encoder_outputs", None) is not None:
                warnings.warn("encoder_outputs is ignored: the encoder must see the virtual tokens", stacklevel=3)
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _prepend(kwargs["attention_mask"], n, 1)
            embeds = self._prompt_prepend_embeddings(input_ids, None, input_ids.shape[0], rows=n)
            return base.generate(inputs_embeds=embeds, **kwargs)
        cache_key = _cache_kwarg(base)

        def inject(original: Callable[..., dict], *a: Any, **kw: Any) -> dict:
            prefill = _is_prefill(kw)
            inputs = original(*a, **kw)
            if inputs.get("decoder_attention_mask") is not None:
                inputs["decoder_attention_mask"] = _prepend_2d_mask(inputs["decoder_attention_mask"], n)
            if prefill:
                inputs.pop("past_key_values", None)
                inputs[cache_key] = self._prompt_prefix_cache(inputs["decoder_input_ids"].shape[0])
            return inputs

        with _wrapped_prepare_inputs(base, inject):
            return base.generate(input_ids=input_ids, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _build_encoder(config: PromptLearningConfig, word_embeddings: nn.Module | None) -> VirtualTokenEncoder:
    """The encoder module registered for `config`'s method (its model-shape fields must be filled)."""
    encoder_cls = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(config.peft_type)]
    if PeftType(config.peft_type) is PeftType.PROMPT_TUNING:
        return encoder_cls(config, word_embeddings)  # its TEXT / SAMPLE_VOCAB inits read the word embeddings
    return encoder_cls(config)


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("pass input_ids or inputs_embeds")


def _prepend(values: torch.Tensor | None, count: int, fill: int) -> torch.Tensor | None:
    """`values` (batch, length) with `count` columns of `fill` in front (None stays None)."""
    if values is None:
        return None
    front = torch.full((values.shape[0], count), fill, dtype=values.dtype, device=values.device)
    return torch.cat((front, values), dim=1)


def _prepend_2d_mask(mask: Any, count: int) -> Any:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(
            "prompt learning extends the 2D attention mask during generate(); this generation setup produced a "
            f"{type(mask).__name__} mask (static/compiled caches are not supported with prompt learning)"
        )
    return _prepend(mask, count, 1)


def _is_prefill(generation_kwargs: dict[str, Any]) -> bool:
    """Whether this generation step feeds the whole input (so the virtual tokens go in): the cache is empty, or
    there is no cache to keep them (use_cache=False re-runs the whole sequence every step)."""
    if generation_kwargs.get("use_cache") is False:
        return True
    cache = generation_kwargs.get("cache", generation_kwargs.get("past_key_values"))
    if cache is None:
        return True
    get_length = getattr(cache, "get_seq_length", None)
    return callable(get_length) and get_length() == 0


def _cache_kwarg(model: nn.Module) -> str:
    """The keyword under which `model` (or, through **kwargs, its backbone) takes a KV cache."""
    candidates = [model]
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        candidates.append(backbone)
    for module in candidates:
        params = inspect.signature(module.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    raise ValueError(
        f"{type(model).__name__}.forward takes no KV cache (no `cache` / `past_key_values` argument), which prefix "
        "tuning needs; use prompt tuning or P-tuning for this model"
    )


@contextmanager
def _wrapped_prepare_inputs(base: nn.Module, inject: Callable[..., dict]) -> Iterator[None]:
    """Route `base.prepare_inputs_for_generation` through `inject(original, ...)` inside the block."""
    original = base.prepare_inputs_for_generation
    had_instance_attr = "prepare_inputs_for_generation" in base.__dict__

    def prepare(*args: Any, **kwargs: Any) -> dict:
        return inject(original, *args, **kwargs)

    base.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if had_instance_attr:
            base.prepare_inputs_for_generation = original
        else:
            del base.prepare_inputs_for_generation
