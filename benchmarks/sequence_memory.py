"""Embedding + DIN target attention, forward and backward, over long skewed histories: the old
padded path against the jagged path (issue 10 part 4), side by side in one run.

    .venv/bin/python benchmarks/sequence_memory.py [--batch 256] [--dim 64] [--mean-length 1000] \
        [--max-len 10000] [--steps 3] [--threads 2]

History lengths are lognormal (sigma 1), scaled so that their mean is about ``--mean-length``,
clipped to [1, ``--max-len``], one row at exactly ``--max-len``. Paths, all from the same weights
and the same batch:

- ``padded``: the old code, copied here: the sequence lookup padded to the schema's max_len
  (``jagged_to_padded_dense``, as the old ``FeatureEmbeddings`` did), then the old
  ``TargetAttention`` over ``(B, max_len, D)`` keys with a ``(B, max_len)`` mask (its MLP already
  ran on the real positions only) and the old ``Dice`` (autograd through ``batch_norm``, the
  sigmoid and the gate). The baseline of the attention rows.
- ``padded_dice``: the same with the lean ``Dice`` (``Dice(lean=True)``: keeps only its input for
  the backward and recomputes its gate there): what that lever alone gives the old padded code.
- ``jagged_concat``: no padding; the attention MLP (old ``Dice``) on the ``(N, 4D)`` concatenation
  ``[q, k, q - k, q ⊙ k]``, to show which part of the gain is the padding.
- ``jagged_prev``: the jagged layer as first written (first-layer split by autograd, old ``Dice``,
  ``index_add`` segment sums); ``jagged_prev_dice``: the same with the lean ``Dice``.
- ``jagged``: the library's default: ``FeatureEmbeddings`` -> ``JaggedSequence`` ->
  ``TargetAttention`` (the first layer as one autograd function that recomputes ``q ⊙ k``,
  ``segment_reduce`` sums, autograd's ``Dice``).
- ``jagged_recompute``: the library's memory-first mode, ``TargetAttention(recompute=True)``: lean
  ``Dice`` layers and the unit after its first layer checkpointed (run again in the backward).
- ``padded_mean`` / ``jagged_mean``: the history as a mean-pooled field instead (how every other
  model reads a sequence): the old ``EmbeddedFeatures.mean_pooled`` over the max_len-padded
  lookup against ``JaggedSequence.mean_pooled``; no attention MLP, so this pair isolates what
  padding costs.

Each path runs in a fresh subprocess. Peak memory on CPU is the growth of the process's peak
resident set (``ru_maxrss``) from just before the first step to the end (so the batch, the tables
and the interpreter are not counted); on CUDA ``torch.cuda.max_memory_allocated`` over the steps.
Step time (forward + backward) is the fastest of ``--steps`` rounds after a warm-up round, the paths
interleaved round by round in one more process (the median is printed too). The paths' outputs and
gradients are checked equal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

PATHS = ("padded", "padded_dice", "jagged_concat", "jagged_prev", "jagged_prev_dice", "jagged", "jagged_recompute",
         "padded_mean", "jagged_mean")
BASELINE = {path: "padded_mean" if path.endswith("_mean") else "padded" for path in PATHS}


def old_layers(layers: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layers`` with each ``Dice`` run as it was before (autograd keeps its input, the sigmoid and the gate)."""
    from rec_dist.layers.mlp import Dice

    for layer in layers:
        if isinstance(layer, Dice):
            z = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, training=layer.training,
                                               momentum=layer.momentum, eps=layer.eps)  # (N, C)
            p = torch.sigmoid(z)  # (N, C)
            x = x * (layer.alpha + p * (1.0 - layer.alpha))  # (N, C)
        else:
            x = layer(x)
    return x


class OldMLP(torch.nn.Module):
    """The attention's MLP with the old ``Dice``."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return old_layers(self.mlp.layers, x)


class OldTargetAttention(torch.nn.Module):
    """The padded target attention as it was before issue 10 (rec_dist/layers/attention.py)."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = keys.shape
        mask = mask.bool()
        real = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the real positions
        k = keys.reshape(batch * length, dim).index_select(0, real)  # (N, D)
        q = query.index_select(0, torch.div(real, length, rounding_mode="floor"))  # (N, D)
        units = torch.cat([q, k, q - k, q * k], dim=1)  # (N, 4D)
        weights = self.mlp(units).squeeze(1)  # (N,)
        return weights.new_zeros(batch * length).scatter(0, real, weights).view(batch, length)  # (B, L)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(query, keys, mask)  # (B, L)
        return torch.bmm(w.unsqueeze(1), keys).squeeze(1)  # (B, D)


def lengths_for(args: argparse.Namespace) -> np.ndarray:
    rng = np.random.default_rng(args.seed)
    raw = rng.lognormal(0.0, 1.0, args.batch)
    lengths = np.clip(np.rint(raw / raw.mean() * args.mean_length), 1, args.max_len).astype(np.int64)
    lengths[0] = args.max_len
    return lengths


def build(args: argparse.Namespace, device: torch.device):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from rec_dist.data.batch import Batch
    from rec_dist.data.schema import Schema
    from rec_dist.embedding.collection import FeatureEmbeddings
    from rec_dist.layers.attention import TargetAttention

    schema = Schema.from_dict({
        "name": "long-histories",
        "tables": {"item": {"num_embeddings": args.items, "embedding_dim": args.dim, "init_std": 0.1}},
        "features": {
            "item_id": {"kind": "sparse", "table": "item"},
            "hist_item_id": {"kind": "sequence", "table": "item", "max_len": args.max_len},
        },
        "labels": {"like": {"kind": "binary"}},
    })
    lengths = lengths_for(args)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.items, (args.batch + int(lengths.sum()),), generator=generator)
    batch = Batch(
        sparse=KeyedJaggedTensor.empty(),
        sequence=KeyedJaggedTensor(
            keys=["item_id", "hist_item_id"],
            values=ids,
            lengths=torch.from_numpy(np.concatenate([np.ones(args.batch, np.int64), lengths]).astype(np.int32)),
        ),
        dense=torch.zeros(args.batch, 0),
    ).to(device)
    torch.manual_seed(args.seed)
    embeddings = FeatureEmbeddings(schema, device=device)
    attention = TargetAttention(args.dim, (80, 40), activation="dice").to(device)  # DIN's defaults
    return embeddings, attention, batch


def step(path: str, embeddings, attention, batch, max_len: int) -> torch.Tensor:
    """Forward and backward of one path; returns the interest ``(B, D)``."""
    # lean Dice layers (and, in the layer itself, the checkpoint) for the forward and the backward
    attention.recompute = path in ("padded_dice", "jagged_prev_dice", "jagged_recompute")
    out = embeddings(batch)
    query = out.pooled["item_id"]  # (B, D)
    history = out.sequences["hist_item_id"]
    if path in ("padded", "padded_dice"):
        keys = torch.ops.fbgemm.jagged_to_padded_dense(history.values, [history.offsets], [max_len], 0.0)  # (B, L, D)
        mask = torch.arange(max_len, device=keys.device).unsqueeze(0) < history.lengths.unsqueeze(1)  # (B, L)
        mlp = OldMLP(attention.mlp) if path == "padded" else attention.mlp
        interest = OldTargetAttention(mlp)(query, keys, mask)  # (B, D)
    elif path == "jagged_concat":
        rows = history.rows  # (N,)
        q, k = query.index_select(0, rows), history.values  # (N, D)
        w = OldMLP(attention.mlp)(torch.cat([q, k, q - k, q * k], dim=1)).squeeze(1)  # (N,)
        interest = torch.zeros_like(query).index_add(0, rows, w.unsqueeze(1) * k)  # (B, D)
    elif path in ("jagged_prev", "jagged_prev_dice"):  # the first jagged layer: split by autograd, index_add
        rows, k, first = history.rows, history.values, attention.mlp.layers[0]  # (N,), (N, D)
        w_q, w_k, w_d, w_p = first.weight.split(k.shape[1], dim=1)  # each (H, D)
        per_row = torch.nn.functional.linear(query, w_q + w_d, first.bias)  # (B, H)
        q = query.index_select(0, rows)  # (N, D)
        hidden = per_row.index_select(0, rows) + torch.nn.functional.linear(k, w_k - w_d)  # (N, H)
        hidden = hidden + torch.nn.functional.linear(q * k, w_p)  # (N, H)
        rest = attention.mlp.layers[1:]
        w = (old_layers(rest, hidden) if path == "jagged_prev" else rest(hidden)).squeeze(1)  # (N,)
        interest = torch.zeros_like(query).index_add(0, rows, w.unsqueeze(1) * k)  # (B, D)
    elif path == "jagged_recompute":
        interest = attention(query, history.values, history.offsets)  # (B, D)
    elif path == "padded_mean":  # the old collection and EmbeddedFeatures.mean_pooled
        keys = torch.ops.fbgemm.jagged_to_padded_dense(history.values, [history.offsets], [max_len], 0.0)  # (B, L, D)
        interest = keys.sum(dim=1) / history.lengths.clamp(min=1).unsqueeze(1).to(keys.dtype)  # (B, D)
    elif path == "jagged_mean":
        interest = history.mean_pooled()  # (B, D)
    else:
        interest = attention(query, history.values, history.offsets)  # (B, D)
    (interest * torch.linspace(-1.0, 1.0, interest.shape[1], device=interest.device)).sum().backward()
    attention.recompute = False
    return interest


def memory_of(args: argparse.Namespace) -> dict:
    """Peak memory growth of one path in this (fresh) process over a warm-up step and one step, and the
    output checksums."""
    device = torch.device(args.device)
    embeddings, attention, batch = build(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as fh:
            base = int(fh.read().split()[1]) * resource.getpagesize()  # resident bytes now
    for _ in range(2):
        embeddings.zero_grad(set_to_none=True)
        attention.zero_grad(set_to_none=True)
        interest = step(args.path, embeddings, attention, batch, args.max_len)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB on Linux
    grads = {name: p.grad.double().norm().item() for name, p in attention.named_parameters() if p.grad is not None}
    return {
        "path": args.path,
        "peak_bytes": peak,
        "interest_sum": interest.detach().double().abs().sum().item(),
        "grad_norms": grads,
        "table_grad_norm": embeddings.unpooled.embeddings["item"].weight.grad.double().norm().item(),
    }


def times_of(args: argparse.Namespace) -> dict[str, list[float]]:
    """Step times of every path, interleaved round by round in one process (so that load from other
    processes falls on all paths alike); one warm-up round first."""
    device = torch.device(args.device)
    embeddings, attention, batch = build(args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {path: [] for path in args.paths}
    for round_ in range(args.steps + 1):
        for path in args.paths:
            embeddings.zero_grad(set_to_none=True)
            attention.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            step(path, embeddings, attention, batch, args.max_len)
            sync()
            if round_:
                times[path].append(time.perf_counter() - start)
    return times


def child(args: argparse.Namespace) -> dict:
    from rec_dist.quiet import quiet_startup

    quiet_startup()
    torch.set_num_threads(args.threads)
    return times_of(args) if args.path == "time" else memory_of(args)


def run_child(path: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--path", path], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        sys.exit(f"{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--mean-length", type=int, default=1000)
    parser.add_argument("--max-len", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--path", help=argparse.SUPPRESS)  # internal: measure one path (or "time") as JSON
    args = parser.parse_args()
    if args.path:
        print(json.dumps(child(args)))
        return

    lengths = lengths_for(args)
    print(f"batch {args.batch}, dim {args.dim}, {args.items} items, device {args.device}, {args.threads} threads")
    print(f"history lengths: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
          f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}; N = {lengths.sum()} events, "
          f"padded to max_len {args.max_len}: {args.batch * args.max_len} slots "
          f"({args.batch * args.max_len / lengths.sum():.1f}x)")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    results = {path: run_child(path) for path in args.paths}  # memory: a fresh process per path
    for path, times in run_child("time").items():
        results[path]["step_s"] = min(times)
        results[path]["median_s"] = statistics.median(times)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"\n{'path':<17} {'peak MB':>9} {'step s min':>11} {'median':>8} {'baseline':>12} {'memory ratio':>13} "
          f"{'speedup':>8}")
    for path, r in results.items():
        base = results.get(BASELINE[path])
        memory = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base else "-"
        speed = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        print(f"{path:<17} {r['peak_bytes'] / 2**20:>9.0f} {r['step_s']:>11.2f} {r['median_s']:>8.2f} "
              f"{BASELINE[path]:>12} {memory:>13} {speed:>8}")
    for path, r in results.items():  # same weights, same batch: each path agrees with its baseline
        reference = results.get(BASELINE[path])
        if reference is None or reference is r:
            continue
        same = math.isclose(r["interest_sum"], reference["interest_sum"], rel_tol=1e-4) and math.isclose(
            r["table_grad_norm"], reference["table_grad_norm"], rel_tol=1e-4
        ) and all(math.isclose(r["grad_norms"][k], v, rel_tol=1e-3) for k, v in reference["grad_norms"].items())
        print(f"{path}: output and gradients equal to {reference['path']}'s: {same}")
    if "padded" in results and "jagged" in results:
        memory = results["jagged"]["peak_bytes"] / results["padded"]["peak_bytes"]
        speed = results["padded"]["step_s"] / results["jagged"]["step_s"]
        print(f"\ntarget (embedding + DIN attention) memory <= 1/5 of padded: {'met' if memory <= 0.2 else 'MISSED'} "
              f"({memory:.3f})")
        print(f"target (embedding + DIN attention) speed >= 2x padded: {'met' if speed >= 2.0 else 'MISSED'} "
              f"({speed:.2f}x)")

if __name__ == "__main__":
    main()
