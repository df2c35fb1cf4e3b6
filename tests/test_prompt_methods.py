"""Prompt tuning, P-tuning and prefix tuning: interop with the real HF PEFT, generate(), training and bad configs."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import oxpeft
from conftest import assert_saved_like_peft, make_bert_seq_cls, make_llama, twin

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")

ATOL = 1e-5
N_TOKENS = 3


def make_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    # initializer_factor 2: the random model's greedy output is not one token over and over, and its logits stay
    # small enough (~10) for fp32 to resolve the 1e-5 tolerance.
    config = T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, initializer_factor=2.0, dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


TASKS = {"CAUSAL_LM": make_llama, "SEQ_CLS": make_bert_seq_cls, "SEQ_2_SEQ_LM": make_t5}

METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning-mlp": ("PromptEncoderConfig", dict(encoder_hidden_size=16)),
    "ptuning-lstm": ("PromptEncoderConfig", dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=16)),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-proj": ("PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=16)),
}
CASES = [(task, method) for task in TASKS for method in METHODS]
# PEFT 0.21.2 cannot run prefix tuning on BERT under transformers 5 (it looks for `past_key_values` in a forward
# that now takes `cache`), so those files are compared tensor by tensor instead of by logits.
PEFT_CANNOT_RUN = {("SEQ_CLS", "prefix"), ("SEQ_CLS", "prefix-proj")}


def config(lib, task: str, method: str, **extra):
    cls_name, kwargs = METHODS[method]
    return getattr(lib, cls_name)(task_type=task, num_virtual_tokens=N_TOKENS, **kwargs, **extra)


def inputs(task: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(99)
    ids = torch.randint(2, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row, so the extended attention mask matters
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "CAUSAL_LM":
        batch["labels"] = ids.clone()
    elif task == "SEQ_CLS":
        batch["labels"] = torch.tensor([0, 2])
    else:
        batch["labels"] = torch.randint(2, 256, (2, 5))
    return batch


def run(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.loss


def changed(logits: torch.Tensor, base_logits: torch.Tensor) -> bool:
    """Whether the adapter changed the outputs of the real tokens (prepended prompts add positions in front)."""
    if logits.dim() == 3:
        logits = logits[:, -base_logits.shape[1] :]
    return not torch.allclose(logits, base_logits)


def scramble(model) -> None:
    """Move every prompt-encoder weight away from its init, so a broken load cannot pass unnoticed."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def file_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------------------------
# interop
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,method", CASES)
def test_oxpeft_adapter_loads_in_peft(task, method, tmp_path):
    base = TASKS[task]()
    batch = inputs(task)
    torch.manual_seed(7)
    ours = oxpeft.get_peft_model(twin(base), config(oxpeft, task, method))
    scramble(ours)
    ours.eval()
    logits, loss = run(ours, batch)
    assert changed(logits, run(base, batch)[0]), "the adapter must change the output"
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    torch.testing.assert_close(
        peft.get_peft_model_state_dict(theirs)["prompt_embeddings"], ours.get_prompt_embedding_to_save("default")
    )
    if (task, method) in PEFT_CANNOT_RUN:
        return
    their_logits, their_loss = run(theirs, batch)
    torch.testing.assert_close(their_logits, logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(their_loss, loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task,method", CASES)
def test_peft_adapter_loads_in_oxpeft(task, method, tmp_path):
    base = TASKS[task]()
    batch = inputs(task)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(twin(base), config(peft, task, method))
    scramble(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)

    # The oracle is what PEFT itself computes from this file. (PEFT's in-memory P-tuning model can differ from it in
    # the last bit: its LSTM rounds differently with and without autograd, and the tiny T5 amplifies that.)
    theirs = peft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    ours = oxpeft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    assert isinstance(ours, oxpeft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[oxpeft.TaskType(task)])
    assert not any(p.requires_grad for p in ours.parameters()), "a model loaded for inference is frozen"
    torch.testing.assert_close(
        ours.get_prompt_embedding_to_save("default"), peft.get_peft_model_state_dict(theirs)["prompt_embeddings"]
    )
    if (task, method) in PEFT_CANNOT_RUN:
        assert changed(run(ours, batch)[0], run(base, batch)[0])
        return
    logits, loss = run(ours, batch)
    their_logits, their_loss = run(theirs, batch)
    torch.testing.assert_close(logits, their_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, their_loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task,method", [(t, m) for t in TASKS for m in ("prompt", "ptuning-lstm", "prefix-proj")])
def test_saved_files_match_peft(task, method, tmp_path):
    """Same tensor keys and shapes, same config keys and values as HF PEFT writes for the same config."""
    base = TASKS[task]()
    oxpeft.get_peft_model(twin(base), config(oxpeft, task, method)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(twin(base), config(peft, task, method)).save_pretrained(tmp_path / "theirs")

    # PEFT appends the classifier heads to modules_to_save twice for prompt learning; oxpeft lists them once.
    def once(config):
        if config["modules_to_save"] is not None:
            config["modules_to_save"] = sorted(set(config["modules_to_save"]))

    assert_saved_like_peft(tmp_path / "ours", tmp_path / "theirs", normalise=once)


def _word_level_tokenizer(directory) -> str:
    """A tiny WordLevel tokenizer saved locally (ids stay inside the tiny models' vocabulary of 256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "classify": 5, "the": 17, "sentiment": 42, "of": 99, "review": 200}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("num_virtual_tokens", [3, 8])
def test_text_init_equals_peft(num_virtual_tokens, tmp_path):
    """TEXT init: the init text's token embeddings, cut or repeated to length, exactly as PEFT builds them."""
    tokenizer = _word_level_tokenizer(tmp_path / "tok")
    text = "classify the sentiment of review"
    kwargs = dict(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer,
    )
    base = make_llama()
    ours = oxpeft.get_peft_model(twin(base), oxpeft.PromptTuningConfig(**kwargs))
    theirs = peft.get_peft_model(twin(base), peft.PromptTuningConfig(**kwargs))
    ids = ([5, 17, 42, 99, 200] * 2)[:num_virtual_tokens]
    expected = base.get_input_embeddings().weight[ids]
    torch.testing.assert_close(ours.get_prompt_embedding_to_save("default"), expected)
    torch.testing.assert_close(theirs.get_prompt_embedding_to_save("default"), expected)


# --------------------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------------------
def greedy_by_forward(model, task: str, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes, no cache: the definition generate() must reproduce."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = ids if task == "CAUSAL_LM" else torch.zeros((ids.shape[0], 1), dtype=torch.long)
    for _ in range(steps):
        with torch.no_grad():
            if task == "CAUSAL_LM":
                # generate() numbers positions from the attention mask (left padding aware); PEFT's forward shifts
                # them past a prefix and drops them for prepended prompts
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=out, attention_mask=mask, position_ids=positions).logits
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            else:
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits
        out = torch.cat((out, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out


@pytest.mark.parametrize("task,method", [(t, m) for t in ("CAUSAL_LM", "SEQ_2_SEQ_LM") for m in METHODS])
def test_generate_is_greedy_decoding_of_peft_forward(task, method, tmp_path):
    """generate() (with the KV cache) equals greedy decoding through HF PEFT's own forward of the same adapter.

    PEFT 0.21.2's own causal-LM generate() re-injects the virtual tokens after the first step under transformers 5
    and so departs from its forward; its forward is the oracle here.
    """
    base = TASKS[task]()
    batch = inputs(task)
    batch.pop("labels")
    torch.manual_seed(7)
    ours = oxpeft.get_peft_model(twin(base), config(oxpeft, task, method))
    scramble(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin(base), str(tmp_path))

    steps = 6
    generated = ours.generate(**batch, max_new_tokens=steps, do_sample=False)
    expected = greedy_by_forward(theirs, task, batch, steps)
    assert torch.equal(generated, expected)
    assert not torch.equal(generated, base.generate(**batch, max_new_tokens=steps, do_sample=False))
    # the same with use_cache=False, where every step sees the virtual tokens afresh
    assert torch.equal(ours.generate(**batch, max_new_tokens=steps, do_sample=False, use_cache=False), expected)
    assert "prepare_inputs_for_generation" not in ours.base_model.__dict__, "generate() must restore the model"


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task,method",
    [("CAUSAL_LM", "prompt"), ("CAUSAL_LM", "ptuning-lstm"), ("CAUSAL_LM", "prefix-proj"), ("SEQ_CLS", "ptuning-mlp"),
     ("SEQ_CLS", "prefix"), ("SEQ_2_SEQ_LM", "prefix"), ("SEQ_2_SEQ_LM", "prompt")],
)
def test_training_lowers_loss_and_touches_only_the_adapter(task, method, tmp_path):
    base = TASKS[task]()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(3)
    model = oxpeft.get_peft_model(base, config(oxpeft, task, method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(n.startswith("prompt_encoder.default.") or ".modules_to_save.default." in n for n in trainable)
    batch = inputs(task)
    if task != "SEQ_CLS":
        batch["labels"] = torch.full_like(batch["labels"], 7)  # a target the virtual tokens alone can steer toward
    lr = 0.02 if task == "SEQ_2_SEQ_LM" else 0.1  # the tiny T5's large activations want smaller steps
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    before = eval_loss()
    model.train()
    for _ in range(10):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = eval_loss()
    assert after < 0.95 * before, (before, after)
    for key, value in model.get_base_model().state_dict().items():
        if "modules_to_save" not in key and "original_module" not in key:
            assert torch.equal(value, frozen[key]), key

    # the trained adapter reloads (in oxpeft and in PEFT) with the outputs it trained to
    model.save_pretrained(tmp_path)
    expected = run(model, batch)[0]
    reloaded = oxpeft.PeftModel.from_pretrained(TASKS[task](), str(tmp_path))
    torch.testing.assert_close(run(reloaded, batch)[0], expected, atol=ATOL, rtol=0)
    if (task, method) not in PEFT_CANNOT_RUN:
        theirs = peft.PeftModel.from_pretrained(TASKS[task](), str(tmp_path))
        torch.testing.assert_close(run(theirs, batch)[0], expected, atol=ATOL, rtol=0)


def test_prompt_tuning_resumes_training_from_a_file(tmp_path):
    """Prompt tuning's saved output IS its parameter, so (unlike PEFT) it can be loaded with is_trainable=True."""
    base = make_llama()
    model = oxpeft.get_peft_model(twin(base), oxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path)
    resumed = oxpeft.PeftModel.from_pretrained(twin(base), str(tmp_path), is_trainable=True)
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    saved = model.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(resumed.get_prompt_embedding_to_save("default"), saved)


# --------------------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------------------
def test_several_adapters_switch_disable_and_delete(tmp_path):
    base = make_llama()
    batch = inputs("CAUSAL_LM")
    batch.pop("labels")
    model = oxpeft.get_peft_model(twin(base), oxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    first = run(model, batch)[0]
    model.add_adapter("other", oxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    assert model.active_adapter == "default"
    torch.testing.assert_close(run(model, batch)[0], first)
    assert not any(p.requires_grad for p in model.prompt_encoder["other"].parameters())
    model.set_adapter("other")
    assert model.prompt_encoder["other"].embedding.weight.requires_grad
    assert not model.prompt_encoder["default"].embedding.weight.requires_grad
    assert changed(run(model, batch)[0], first[:, -8:])
    with model.disable_adapter():
        torch.testing.assert_close(run(model, batch)[0], run(base, batch)[0])

    # both adapters save (the second in its own folder) and come back through load_adapter
    model.save_pretrained(tmp_path)
    reloaded = oxpeft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    reloaded.load_adapter(str(tmp_path / "other"), "other")
    assert reloaded.active_adapter == "default"
    torch.testing.assert_close(run(reloaded, batch)[0], first)
    reloaded.set_adapter("other")
    torch.testing.assert_close(run(reloaded, batch)[0], run(model, batch)[0])

    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.prompt_encoder) == ["default"]
    torch.testing.assert_close(run(model, batch)[0], first)
    with pytest.raises(ValueError, match="PREFIX_TUNING adapter to a model with PROMPT_TUNING"):
        model.add_adapter("x", oxpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


def test_seq_cls_head_is_saved_and_disabled_with_the_adapter(tmp_path):
    base = make_bert_seq_cls()
    batch = inputs("SEQ_CLS")
    batch.pop("labels")
    model = oxpeft.get_peft_model(twin(base), config(oxpeft, "SEQ_CLS", "prompt"))
    with torch.no_grad():
        model.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, batch)[0], run(base, batch)[0])
    model.save_pretrained(tmp_path)
    keys = set(file_tensors(tmp_path))
    assert keys == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        ("PromptTuningConfig", dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        ("PromptTuningConfig", dict(num_virtual_tokens=-2), "num_virtual_tokens must be a positive integer"),
        ("PrefixTuningConfig", dict(), "num_virtual_tokens is required"),
        ("PromptTuningConfig", dict(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"),
         "needs tokenizer_name_or_path"),
        ("PromptTuningConfig", dict(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="t"),
         "needs a non-empty prompt_tuning_init_text"),
        ("PromptTuningConfig", dict(num_virtual_tokens=2, tokenizer_kwargs={"a": 1}), "only used with"),
        ("PromptTuningConfig", dict(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "prompt_tuning_init='WORDS'"),
        ("PromptEncoderConfig", dict(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "MLP, LSTM"),
        ("PromptEncoderConfig", dict(num_virtual_tokens=2, encoder_dropout=1.5), "encoder_dropout"),
        ("PrefixTuningConfig", dict(num_virtual_tokens=2, init_weights="ones"), "init_weights"),
        ("PrefixTuningConfig", dict(num_virtual_tokens=2, num_transformer_submodules=3), "num_transformer_submodules"),
        ("PrefixTuningConfig", dict(num_virtual_tokens=2, token_dim=0), "token_dim"),
    ],
)
def test_bad_configs_are_refused(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(oxpeft, cls)(task_type="CAUSAL_LM", **kwargs)


def test_bad_setups_are_refused_and_change_nothing(tmp_path):
    base = make_llama()
    with pytest.raises(ValueError, match="needs task_type"):
        oxpeft.get_peft_model(twin(base), oxpeft.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="needs task_type"):
        oxpeft.get_peft_model(twin(base), oxpeft.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        oxpeft.get_peft_model(
            base,
            oxpeft.PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="TEXT",
                prompt_tuning_init_text="hi", tokenizer_name_or_path=str(tmp_path / "missing"),
            ),
        )
    assert all(p.requires_grad for p in base.parameters()), "a refused wrap leaves the model as it was"
    with pytest.raises(ValueError, match="modules_to_save entries match no module: 'clasifier'"):
        oxpeft.get_peft_model(
            twin(base),
            oxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, modules_to_save=["clasifier"]),
        )

    # a P-tuning file holds the encoder's output only: it loads for inference, not for training
    oxpeft.get_peft_model(twin(base), config(oxpeft, "CAUSAL_LM", "ptuning-mlp")).save_pretrained(tmp_path / "pt")
    target = twin(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="load it with is_trainable=False"):
        oxpeft.PeftModel.from_pretrained(target, str(tmp_path / "pt"), is_trainable=True)

    # a prompt of the wrong size names the tensor and both shapes
    tensors = file_tensors(tmp_path / "pt")
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:2]
    save_file(tensors, str(tmp_path / "pt" / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'prompt_embeddings' has shape \(2, 64\) but the config gives \(3, 64\)"):
        oxpeft.PeftModel.from_pretrained(target, str(tmp_path / "pt"))
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert "prepare_inputs_for_generation" not in target.__dict__

    model = oxpeft.get_peft_model(twin(base), config(oxpeft, "CAUSAL_LM", "prompt"))
    with pytest.raises(ValueError, match="per-sample adapter_names"):
        model(input_ids=torch.ones((2, 3), dtype=torch.long), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="takes input_ids, not inputs_embeds"):
        model.generate(inputs_embeds=torch.zeros((1, 2, 64)), max_new_tokens=2)
