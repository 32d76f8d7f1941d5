"""Global gradient-norm clipping that also covers tables whose optimizer is fused into the backward.

FBGEMM's table-batched kernels (TBE) apply the sparse optimizer inside
their backward, so the gradient of a fused table never materialises and
``clip_grad_norm_`` cannot see it; clipping only the dense part would leave
the tables unclipped. Clipping by the global norm

    c = min(1, max_norm / sqrt(sum_dense ||g||^2 + sum_fused_rows ||g_row||^2))

needs the whole norm before any fused update runs. So the backward is cut in
two at the output of every fused TBE:

1. a forward hook hands the rest of the model a detached copy of the TBE's
   output (a leaf that collects the gradient) and keeps the real output;
2. ``loss.backward()`` then fills the dense gradients (DDP all-reduces them)
   and the gradient at each TBE output, while no table is touched;
3. ``clip`` sums each table row's gradient from the TBE's own indices,
   offsets and per-sample weights (a row read by several bags adds up,
   exactly as the kernel would), adds the dense part, scales the dense
   gradients by c and runs the TBE backward with the output gradient times
   c: the fused optimizer updates with the clipped gradient.

Sharded (DistributedModelParallel): each rank's TBEs hold its shards and see
the gradients of every rank's samples for them (TorchRec's all-to-all), so the
per-row sums are exact on the owner and the squared norms add over ranks.
TorchRec divides those gradients by the world size in the all-to-all backward,
so they are the global-batch mean, like DDP's dense gradients: the norm is the
one a single process with the global batch computes (tests/test_clipping.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _PendingLookup:
    module: nn.Module
    output: torch.Tensor  # the TBE's real output: its grad_fn runs the fused update
    boundary: torch.Tensor  # the detached leaf the model used instead
    indices: torch.Tensor
    offsets: torch.Tensor
    per_sample_weights: torch.Tensor | None


def fused_lookup_modules(model: nn.Module) -> list[nn.Module]:
    """FBGEMM training TBEs inside ``model`` whose optimizer runs in the backward (dense kernels excluded)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    return [m for m in _all_modules(model) if isinstance(m, SplitTableBatchedEmbeddingBagsCodegen)]


def _all_modules(root: nn.Module):
    """``root.modules()`` plus modules TorchRec keeps in plain lists (``_lookups``, ``_emb_modules``)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield module
        stack.extend(module.children())
        for value in vars(module).values():
            if isinstance(value, list | tuple):
                stack.extend(v for v in value if isinstance(v, nn.Module))


class GlobalNormClipper:
    """Clips dense parameters and fused embedding rows together by their global L2 norm."""

    def __init__(self, model: nn.Module, max_norm: float, world_size: int = 1, process_group=None) -> None:
        if max_norm <= 0:
            raise ValueError(f"gradient_clip_val must be > 0, got {max_norm}")
        self.model, self.max_norm = model, float(max_norm)
        self.world_size, self.process_group = world_size, process_group
        self._pending: list[_PendingLookup] = []
        self._handles = [m.register_forward_hook(self._cut, with_kwargs=True) for m in fused_lookup_modules(model)]

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._pending = [], []

    # ---- forward: cut the graph at the fused lookups ----------------------------------------
    def _cut(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        if not (torch.is_grad_enabled() and module.training and output.requires_grad):
            return None
        names = ("indices", "offsets", "per_sample_weights")
        given = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
        boundary = output.detach().requires_grad_()
        self._pending.append(_PendingLookup(module, output, boundary, given["indices"], given["offsets"],
                                            given.get("per_sample_weights")))
        return boundary

    # ---- after loss.backward(): norm, scale, fused update -----------------------------------
    def clip(self, dense_parameters) -> torch.Tensor:
        """Scale the dense gradients and run the pending fused updates with the clipped gradient.

        Returns the global norm before clipping.
        """
        grads = [p.grad for p in dense_parameters if p.grad is not None]
        dense_sq = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros(()))
        sparse_sq = torch.zeros(())
        for lookup in self._pending:
            if lookup.boundary.grad is not None:
                sparse_sq = sparse_sq + row_gradient_sq_norm(lookup)
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sparse_sq, group=self.process_group)  # each rank owns other rows
        total = (dense_sq + sparse_sq).sqrt()
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        self.apply_fused_updates(coef)
        return total

    def discard(self) -> None:
        """Forget pending lookups without updating the tables."""
        self._pending = []

    def apply_fused_updates(self, coef: torch.Tensor | float = 1.0) -> None:
        """Run the fused tables' backward (their optimizer step) with the output gradients times ``coef``."""
        outputs, grads = [], []
        for lookup in self._pending:
            if lookup.boundary.grad is not None:
                outputs.append(lookup.output)
                grads.append(lookup.boundary.grad * coef)
        self._pending = []
        if outputs:
            torch.autograd.backward(outputs, grads)


def row_gradient_sq_norm(lookup: _PendingLookup) -> torch.Tensor:
    """Sum over table rows of ||gradient of the row||^2, from a TBE's output gradient and its inputs.

    Pooled TBEs: bag ``(feature f, sample b)`` reads ``indices[offsets[f*B+b] : offsets[f*B+b+1]]``
    and its output is ``out[b, D_offsets[f]:D_offsets[f+1]]`` (sum pooling; mean divides by the
    bag length). Unpooled (sequence) TBEs: row ``i`` of the output belongs to ``indices[i]``.
    """
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

    module, grad = lookup.module, lookup.boundary.grad.float()
    table_of_feature = torch.as_tensor(module.feature_table_map, dtype=torch.long)
    num_features = table_of_feature.numel()
    offsets, indices = lookup.offsets.long(), lookup.indices.long()
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # bag of every index
    batch = lengths.numel() // num_features
    feature, sample = bag // batch, bag % batch
    weights = None if lookup.per_sample_weights is None else lookup.per_sample_weights.float()
    if module.pooling_mode == PoolingMode.MEAN:
        inverse = 1.0 / lengths.clamp(min=1).float()[bag]
        weights = inverse if weights is None else weights * inverse
    d_offsets = module.D_offsets.tolist()
    total = torch.zeros(())
    for table in table_of_feature.unique().tolist():
        keys, rows = [], []
        for f in (table_of_feature == table).nonzero().flatten().tolist():
            mask = feature == f
            if module.pooling_mode == PoolingMode.NONE:
                g = grad[mask.nonzero().flatten()][:, : d_offsets[f + 1] - d_offsets[f]]
            else:
                g = grad[sample[mask], d_offsets[f] : d_offsets[f + 1]]
            if weights is not None:
                g = g * weights[mask].unsqueeze(1)
            keys.append(indices[mask])
            rows.append(g)
        keys_t, rows_t = torch.cat(keys), torch.cat(rows)
        if keys_t.numel() == 0:
            continue
        unique, inverse = torch.unique(keys_t, return_inverse=True)
        summed = torch.zeros(unique.numel(), rows_t.shape[1]).index_add_(0, inverse, rows_t)
        total = total + summed.pow(2).sum()
    return total
