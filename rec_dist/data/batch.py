"""The one batch type every model, task and loader shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """A mini-batch.

    ``sparse`` holds the id features looked up pooled (one vector per feature
    and sample: single ids and multi-hot bags); ``sequence`` holds the
    behaviour sequences and every id feature that shares a table with a
    sequence (the target item, say), looked up unpooled. Both are jagged
    KeyedJaggedTensors: sequences stay unpadded until a model asks for a dense
    view. ``dense`` is ``(B, num_dense)`` float32; ``labels`` maps label name
    to ``(B,)`` float32.
    """

    sparse: KeyedJaggedTensor
    sequence: KeyedJaggedTensor
    dense: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def ids(self, feature: str) -> torch.Tensor:
        """Values of a single-valued id feature, ``(B,)`` (e.g. user ids for GAUC)."""
        kjt = self.sparse if feature in self.sparse.keys() else self.sequence
        return kjt[feature].values()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            sequence=self.sequence.to(device, non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )

    def pin_memory(self) -> Batch:
        return Batch(
            sparse=self.sparse.pin_memory(),
            sequence=self.sequence.pin_memory(),
            dense=self.dense.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        self.sequence.record_stream(stream)
        self.dense.record_stream(stream)
        for value in self.labels.values():
            value.record_stream(stream)
