"""The retrieval training loss: sampled softmax over assembled candidates with the logQ correction.

``RetrievalLoss`` composes the options of two-tower training (each one off
or on independently):

- the **temperature** ``tau`` and the L2-normalised vectors (the model's
  ``normalize``) of ``rec_dist.losses.sampled_softmax``;
- **gathered negatives** (every rank's in-batch items, with gradients),
  **mixed negatives** (uniform from the item table, encoded by the caller) and a
  **cross-batch memory** (``rec_dist.losses.negatives``);
- the **logQ correction** from the streaming frequency estimate
  (``rec_dist.losses.frequency``), and accidental hits masked by item id.

The correction. The candidates are a sample from a mixture: ``n`` columns drawn
from the data stream (the gathered batch and the memory; item ``i`` with
per-sample probability ``p_i``) and ``M`` drawn uniformly from the ``V`` items
of the item table. Every column holding item ``i`` gets the log of the
expected number of columns holding ``i``::

    log Q_i = log(n * p_i + M / V)

subtracted from its logit (an item has one correction whichever block it came
from; with no mixed negatives the constant ``log n`` cancels in the softmax).

Several ranks. With ``gather`` each rank's loss is ``W / sum_r B_r`` times
the sum of its rows' losses, so the mean of the ranks' losses (what DDP's
gradient averaging optimises) is the mean over the global batch even when
ranks hold different batch sizes: 2 workers train exactly like 1 worker on the
concatenated batch (``tests/test_retrieval_negatives.py``). The frequency
estimate always folds in the global batch's ids in rank order, so every rank
holds the same counters; with ``gather`` the memory holds the global batch too
(the same on every rank), without it each rank's memory holds its own rows.
"""

from __future__ import annotations

import torch
from torch import nn

from rec_dist.losses.frequency import StreamingFrequency
from rec_dist.losses.negatives import Candidates, CrossBatchMemory, assemble_candidates, distributed_world, gather_rows
from rec_dist.losses.sampled_softmax import sampled_softmax_loss


class RetrievalLoss(nn.Module):
    """Sampled softmax with gathered / mixed / memory negatives and logQ; see the module docstring.

    Args:
        temperature: tau of the logits ``q·c / tau``.
        frequency: the streaming estimator whose ``p_i`` the logQ correction uses; None: no correction.
        memory_size: vectors kept by the cross-batch memory (0: none).
        gather: gather every rank's in-batch items as candidates (no effect in one process).
    """

    def __init__(self, temperature: float, frequency: StreamingFrequency | None = None, memory_size: int = 0,
                 gather: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.gather = temperature, gather
        self.frequency = frequency
        self.memory = CrossBatchMemory(memory_size) if memory_size > 0 else None

    def log_q(self, candidates: Candidates, corpus_size: int | None) -> torch.Tensor | None:
        """``(N,)`` log expected count of each candidate's item among the columns (None without an estimator)."""
        if self.frequency is None:
            return None
        expected = candidates.num_stream * self.frequency.probability(candidates.ids).to(candidates.vectors.device)
        if candidates.num_uniform:
            if not corpus_size:
                raise ValueError("mixed negatives with the logQ correction need the item table's size (corpus_size)")
            expected = expected + candidates.num_uniform / corpus_size
        return torch.log(expected)  # (N,)

    def forward(
        self,
        query: torch.Tensor,
        items: torch.Tensor,
        item_ids: torch.Tensor,
        mixed: tuple[torch.Tensor, torch.Tensor] | None = None,
        corpus_size: int | None = None,
    ) -> torch.Tensor:
        """Loss of this rank's queries ``(B, d)`` whose positives are ``items`` ``(B, d)`` / ``item_ids`` ``(B,)``.

        ``mixed``: uniform negatives ``((M, d), (M,))`` drawn from ``corpus_size`` items. Advances the
        frequency estimate and the memory by this step's global batch (call once per training step).
        """
        candidates, batch_vectors, batch_ids = assemble_candidates(items, item_ids, self.gather, mixed, self.memory)
        if self.frequency is not None:
            stream_ids = batch_ids if self.gather else gather_rows(item_ids, with_grad=False)[0]
            self.frequency.update(stream_ids)  # the global batch, rank order: same counters on every rank
        losses = sampled_softmax_loss(
            query, candidates.vectors, candidates.labels, item_ids, candidates.ids, self.temperature,
            self.log_q(candidates, corpus_size), reduction="none",
        )  # (B,)
        _, world = distributed_world()
        if self.gather and world > 1:
            loss = losses.sum() * world / batch_ids.shape[0]  # mean over ranks = mean over the global batch
        else:
            loss = losses.mean()
        if self.memory is not None:
            self.memory.enqueue(batch_vectors, batch_ids)
        return loss
