"""Candidate assembly for retrieval's sampled softmax: cross-worker gathering and a cross-batch memory.

The softmax of each query runs over a candidate set built from blocks, in
this column order::

    [ gathered batch positives | mixed negatives | memory ]
      (sum_r B_r, d)              (M, d)            (S, d)

- **gathered batch positives**: every rank's in-batch item vectors, all-gathered
  *with gradients* (``torch.distributed.nn.functional.all_gather``: its backward
  sends each rank the gradient of its own rows, summed over every rank's loss),
  laid out rank by rank; rank ``r``'s row ``b`` has its positive at column
  ``offset_r + b`` with ``offset_r = B_0 + ... + B_{r-1}``. Ranks may hold
  different batch sizes (rows are padded for the collective, then dropped).
- **mixed negatives** (Yang et al., WWW 2020, "Mixed Negative Sampling"): items
  drawn uniformly from the item table and encoded by the item tower; they reach
  items the stream rarely shows.
- **memory** (``CrossBatchMemory``; Wang et al., CVPR 2020, "Cross-Batch Memory"):
  a FIFO of the item vectors of recent batches, detached. They were computed by
  an older model (stale): cheap extra negatives that carry no gradient, useful
  only while the item tower moves slowly (the paper warms up without it).
  Seen here: with ReLU-MLP towers a memory of one to four batches collapsed
  training (MovieLens-100k two-tower, 512 vectors: test Recall@10 0.027, below
  the most-popular 0.050; planted groups: val recall 0.16 instead of 1.0);
  with linear towers it trained as well as without. Off by default.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``x`` ``(B_r, ...)`` concatenated in rank order, and every rank's ``B_r`` ``(W,)``.

    ``with_grad`` keeps the autograd link (the backward returns each rank the gradient of its own rows,
    summed over every rank's loss). One process: ``x`` itself.
    """
    _, world = distributed_world()
    sizes = torch.tensor([x.shape[0]], device=x.device)
    if world == 1:
        return x, sizes
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    sizes = torch.cat(all_sizes)  # (W,)
    longest = int(sizes.max())
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]) if x.shape[0] < longest else x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)]), sizes


class CrossBatchMemory(nn.Module):
    """FIFO of the last ``size`` item vectors (detached) and their ids; see the module docstring.

    Its buffers are not saved in checkpoints (a resumed run refills it within ``size / batch`` steps).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"memory size must be positive, got {size}")
        self.size = size
        self.register_buffer("vectors", torch.empty(0), persistent=False)  # (size, d) once the first batch comes
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64), persistent=False)  # (size,)
        self.filled = 0  # slots holding a vector
        self.next_slot = 0  # where the next vector goes (the oldest one)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(vectors (S, d), ids (S,))`` held now, in slot order (a ring, not by age: the softmax does not care
        about column order); None while empty."""
        if self.filled == 0:
            return None
        return self.vectors[: self.filled], self.ids[: self.filled]

    @torch.no_grad()
    def enqueue(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        """Push ``vectors`` ``(n, d)`` with their ``ids`` ``(n,)``, dropping the oldest beyond ``size``."""
        if self.vectors.numel() == 0:
            self.vectors = vectors.new_zeros(self.size, vectors.shape[1])
        vectors, ids = vectors.detach()[-self.size:], ids[-self.size:]  # more than fits: keep the newest
        slots = (self.next_slot + torch.arange(len(ids))) % self.size  # (n,)
        self.vectors[slots.to(self.vectors.device)] = vectors.to(self.vectors.dtype)
        self.ids[slots.to(self.ids.device)] = ids.to(self.ids.device, torch.int64)
        self.next_slot = (self.next_slot + len(ids)) % self.size
        self.filled = min(self.filled + len(ids), self.size)


class Candidates:
    """One query batch's candidate columns: vectors ``(N, d)``, ids ``(N,)``, labels ``(B,)`` and how many
    columns came from each source (``num_stream``: batch positives and memory; ``num_uniform``: mixed)."""

    def __init__(self, vectors: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                 num_stream: int, num_uniform: int) -> None:
        self.vectors, self.ids, self.labels = vectors, ids, labels
        self.num_stream, self.num_uniform = num_stream, num_uniform


def assemble_candidates(
    items: torch.Tensor,
    item_ids: torch.Tensor,
    gather: bool,
    mixed: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory: CrossBatchMemory | None = None,
) -> tuple[Candidates, torch.Tensor, torch.Tensor]:
    """The candidate columns of the module docstring for this rank's queries.

    ``items`` ``(B, d)`` / ``item_ids`` ``(B,)``: this rank's in-batch positives; ``mixed``: uniform
    negatives ``(M, d)``, ``(M,)`` (this rank's own); ``memory``: read, not written. Returns the candidates
    and the batch block as every rank sees it (``(sum B_r, d)`` vectors and ``(sum B_r,)`` ids) for the
    caller to enqueue once the step is done.
    """
    rank, _ = distributed_world()
    if gather:
        batch_vectors, sizes = gather_rows(items, with_grad=True)  # (sum B_r, d)
        batch_ids, _ = gather_rows(item_ids, with_grad=False)  # (sum B_r,)
        offset = int(sizes[:rank].sum())
    else:
        batch_vectors, batch_ids, offset = items, item_ids, 0
    labels = offset + torch.arange(items.shape[0], device=items.device)  # (B,): rank r's row b -> offset_r + b
    blocks, id_blocks = [batch_vectors], [batch_ids]
    num_stream, num_uniform = batch_ids.shape[0], 0
    if mixed is not None:
        blocks.append(mixed[0])
        id_blocks.append(mixed[1].to(batch_ids.device))
        num_uniform = mixed[0].shape[0]
    held = memory.contents() if memory is not None else None
    if held is not None:
        blocks.append(held[0].to(batch_vectors.dtype))
        id_blocks.append(held[1])
        num_stream += held[1].shape[0]
    candidates = Candidates(torch.cat(blocks), torch.cat(id_blocks), labels, num_stream, num_uniform)
    return candidates, batch_vectors, batch_ids
