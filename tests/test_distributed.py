"""torch.distributed on CPU: DDP (gloo, 2 processes) trains LoRA; FSDP2 fully_shard where torch supports it."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _teardown() -> None:
    # Every rank reaches the barrier before the group goes: destroying it while a peer's gloo work is still
    # in flight aborts that process ("terminate called without an active exception").
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _model():
    import oxpeft
    from conftest import make_llama

    torch.manual_seed(0)
    return oxpeft.get_peft_model(
        make_llama(), oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _setup(rank, world, port)
    try:
        _ddp_train(rank, world, out_dir)  # its models are freed before the group is torn down
    finally:
        _teardown()


def _ddp_train(rank: int, world: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    ddp = DDP(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(3):
        batch = torch.randint(0, 256, (2, 12), generator=gen)
        ddp(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    flat = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    torch.save({"gathered": gathered, "flat": flat}, os.path.join(out_dir, f"rank{rank}.pt"))
    model.save_pretrained(os.path.join(out_dir, "adapter"), is_main_process=rank == 0)


def test_ddp_gloo_two_processes_keeps_adapters_identical(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    gathered = results[0]["gathered"]
    torch.testing.assert_close(gathered[0], gathered[1], atol=0, rtol=0)
    initial = torch.cat([p.detach().flatten() for n, p in _model().named_parameters() if "lora_" in n])
    assert not torch.allclose(results[0]["flat"], initial), "training must move the adapters"
    # rank 0 alone wrote the adapter, and it holds the trained weights
    import oxpeft
    from conftest import make_llama

    loaded = oxpeft.PeftModel.from_pretrained(make_llama(), tmp_path / "adapter")
    flat = torch.cat([p.detach().flatten() for n, p in loaded.named_parameters() if "lora_" in n])
    torch.testing.assert_close(flat, results[0]["flat"])


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _setup(rank, world, port)
    try:
        _fsdp_train(rank, out_dir)  # its sharded model is freed before the group is torn down
    finally:
        _teardown()


def _fsdp_train(rank: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(3):
        batch = torch.randint(0, 256, (2, 12), generator=gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters() if "lora_" in n]
    flat = torch.cat([t.detach().flatten() for t in full])
    torch.save({"losses": losses, "flat": flat}, os.path.join(out_dir, f"fsdp{rank}.pt"))


def test_fsdp2_fully_shard_on_cpu(tmp_path):
    world = 2
    try:
        mp.spawn(_fsdp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    except mp.ProcessRaisedException as exc:
        if "gloo" in str(exc).lower() and "not supported" in str(exc).lower():
            pytest.skip(f"torch {torch.__version__} cannot run FSDP2 collectives on CPU/gloo: {str(exc)[-300:]}")
        raise
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ddp_result = torch.load(tmp_path / "rank0.pt")["flat"]
    for rank in range(world):
        result = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert all(torch.isfinite(torch.tensor(result["losses"])))
        # sharded training computes the same updates as DDP on the same per-rank data
        torch.testing.assert_close(result["flat"], ddp_result, atol=1e-5, rtol=1e-4)


class _AttentionModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(10, 2)
        self.lin0 = torch.nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


def _fsdp1_attention_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import oxpeft
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    _setup(rank, world, port)
    try:
        torch.manual_seed(0)
        model = oxpeft.get_peft_model(_AttentionModel(), oxpeft.LoraConfig(target_modules=["mha"], init_lora_weights=False))
        x = torch.randn(9, 10)
        with torch.no_grad():
            plain = model(x)
        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        with torch.no_grad():
            sharded = wrapped(x)
        state = oxpeft.get_peft_model_state_dict(wrapped)
        torch.save({"x": x, "plain": plain, "sharded": sharded, "state": state}, os.path.join(out_dir, "fsdp1.pt"))
        del wrapped, model
    finally:
        _teardown()


def test_fsdp_wrapped_multihead_attention_keeps_its_adapter(tmp_path):
    """FSDP (use_orig_params) swaps a module's parameters for views of its flat parameter: LoRA on
    nn.MultiheadAttention must read those, and its state dict round-trips."""
    import oxpeft

    mp.spawn(_fsdp1_attention_worker, args=(1, _free_port(), str(tmp_path)), nprocs=1, join=True)
    result = torch.load(tmp_path / "fsdp1.pt")
    torch.testing.assert_close(result["sharded"], result["plain"])
    torch.manual_seed(0)
    fresh = oxpeft.get_peft_model(_AttentionModel(), oxpeft.LoraConfig(target_modules=["mha"]))
    oxpeft.set_peft_model_state_dict(fresh, result["state"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(result["x"]), result["plain"])
