"""`BufferDict`: per-adapter tensors held as buffers of a module, so they follow `.to()`; saved in the state dict
or not (`persistent`)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class BufferDict(nn.Module):
    def __init__(self, persistent: bool = False) -> None:
        super().__init__()
        self.persistent = persistent

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=self.persistent)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]
        self._non_persistent_buffers_set.discard(name)

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._buffers))

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> list[str]:
        return list(self._buffers)

    def values(self) -> list[torch.Tensor]:
        return list(self._buffers.values())

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._buffers.items())
