"""TorchRec sharding (issue 3): peak memory per rank at world size 1 vs 2, and training throughput
of the fused sparse path vs plain ``nn.EmbeddingBag`` + dense Adam, printed side by side.

    .venv/bin/python benchmarks/sharding.py                       # both parts, default sizes
    .venv/bin/python benchmarks/sharding.py --part memory --big-rows 20000000
    .venv/bin/python benchmarks/sharding.py --part throughput --rows 1000000 5000000 20000000

Model: DCN-V2 (2 cross layers, MLP 256-128) over a hand-built schema: one big id table
(``--big-rows``, dim 16) or, in the ``2 big`` variant, two tables of half that size, plus three
small tables (a 10k-row multi-hot, 1000 and 24 rows) and one dense feature. Every id feature
says ``on_oov: hash``: raw ids are a Zipf(``--zipf``) rank over the big vocabulary scattered
through [0, 2^48) by an odd multiplier, so nearly all of them are out of range and the data
path (``ColumnChunk.from_arrow``) hashes them into the table by modulo, as the schema says.

Memory (part a). Every cell runs in freshly spawned processes (gloo, one process per rank):
the tables are built on meta (``with embedding_device("meta")``) so no rank ever allocates a
full table, ``shard_model`` (the function behind ``--trainer.strategy torchrec``) shards them
with Adagrad fused into the backward, and ``--memory-steps`` training steps run (Adam on the dense
part) so the optimizer state is allocated. Peak RSS is the process's ``ru_maxrss``. An idle
process with the same imports and a gloo group gives the baseline that is subtracted
("net"). The ratio is max over ranks (world 2) / world 1; the issue's target is <= 0.6.
``table_wise`` places whole tables, so with ONE big table the whole table lands on one rank
(ratio ~1 by construction); the ``2 big`` rows show table_wise splitting two tables.
``column_wise`` splits a table by columns in blocks of ``min_partition``; rec_dist's default
block is dim / world size (8 columns here), so the table is split over the ranks. The
``column_wise/16`` rows set ``min_partition: 16`` (TorchRec's own default, 128 columns capped
at the dim, behaves the same): the table stays in one piece.

Throughput (part b). One process, ``--threads`` torch threads (default 1: on this shared 2-core
machine two threads stall each other at every parallel region whenever another process holds a
core), same model and data in every column: ``plain`` is the model on ``torch.nn.EmbeddingBag``
tables (written below) with dense Adam over everything (what a plain PyTorch trainer does: every
row of every table is read and written each step); ``sparse`` is the same with sparse gradients
and ``torch.optim.SparseAdam`` for the tables (the best a plain PyTorch trainer can do);
``dmp`` is ``shard_model`` at world size 1 (table_wise, Adagrad fused into FBGEMM's backward);
``febc`` is the single-process path (``fuse_pooled_tables``: FusedEmbeddingBagCollection). The
dense part trains with Adam (``fused=True``) everywhere. samples/s = batch / median step time
over ``--timed-steps`` after 3 warm-up steps (the median resists the other tenants' bursts);
every cell runs in its own fresh process (its peak RSS is shown too); with ``--repeats`` the
implementations alternate inside each repeat and the median over repeats is shown.

``--gpu`` (used by benchmarks/gpu_check.sh) trains on one CUDA device through ``shard_model``
with a 1-process NCCL group: table_wise/row_wise x fused/fused_uvm_caching (``--gpu-device cpu``:
a dry run of that code on CPU with gloo, for the cells CPU can do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sharding_common import (  # benchmarks/ is on sys.path when the script runs
    DIM,
    dump,
    init_process,
    make_batches,
    make_model,
    make_schema,
    peak_rss_mib,
    plain_embeddings,
    rss_mib,
    sharding_config,
    spawn,
)


# ---- part a: memory ---------------------------------------------------------------------------------
def idle_worker(rank: int, world: int, port: int, out: str, threads: int) -> None:
    init_process(rank, world, port, threads)
    import torch.distributed as dist

    dist.barrier()
    dump(out, {"peak": peak_rss_mib()})
    dist.destroy_process_group()


def memory_worker(rank: int, world: int, port: int, out: str, big: dict, sharding_type: str, width,
                  steps: int, batch_size: int, zipf: float, threads: int) -> None:
    init_process(rank, world, port, threads)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from rec_dist.distributed.strategy import shard_model
    from rec_dist.embedding.collection import embedding_device
    from rec_dist.embedding.fused import SparseOptimizer, fused_parameter_ids

    schema = make_schema(big)
    start = rss_mib()
    torch.manual_seed(0)
    with embedding_device("meta"):
        model = make_model(schema)
    config = sharding_config(schema, sharding_type, width)
    dmp, plan = shard_model(model, SparseOptimizer("adagrad", lr=0.05), config, torch.device("cpu"), world,
                            dist.group.WORLD)
    sharded = rss_mib()
    fused = fused_parameter_ids(dmp)
    dense = torch.optim.Adam([p for p in dmp.parameters() if id(p) not in fused], lr=1e-3)
    batches = make_batches(schema, big, steps, batch_size // world, zipf, seed=rank)
    losses = []
    for batch in batches:
        loss = F.binary_cross_entropy_with_logits(dmp(batch)["click"], batch.labels["click"])
        dense.zero_grad()
        loss.backward()
        dense.step()
        losses.append(loss.item())
    local = sum(
        t.numel() * t.element_size()
        for t in (s.tensor for v in dmp.state_dict().values() if hasattr(v, "local_shards") for s in v.local_shards())
    )
    dist.barrier()
    dump(out, {"start": start, "sharded": sharded, "peak": peak_rss_mib(), "plan": plan, "losses": losses,
               "local_table_mib": local / 2**20})
    dist.destroy_process_group()


def run_memory(args) -> dict:
    half = args.big_rows // 2
    variants = [("1 big", {"item": args.big_rows}), ("2 big", {"user": half, "item": args.big_rows - half})]
    shardings = [("table_wise", "table_wise", None), ("column_wise", "column_wise", None),
                 ("column_wise/16", "column_wise", 16)]
    idle = {w: spawn(idle_worker, w, args.memory_threads) for w in (1, 2)}
    idle_peak = max(r["peak"] for w in idle for r in idle[w])
    rows = []
    for variant, big in variants:
        for label, sharding_type, width in shardings:
            if variant == "2 big" and label == "column_wise/16":
                continue  # same as for one big table: nothing split
            cells = {}
            for world in (1, 2):
                cells[world] = spawn(memory_worker, world, big, sharding_type, width, args.memory_steps,
                                     args.batch_size, args.zipf, args.memory_threads)
            rows.append({"variant": variant, "big": big, "sharding": label, "world1": cells[1], "world2": cells[2]})
            print_memory_row(rows[-1], idle_peak)
            sys.stdout.flush()
    return {"idle": idle, "idle_peak_mib": idle_peak, "rows": rows}


MEMORY_HEADER = (
    f"{'tables':<22} {'sharding':<14} {'w1 peak':>8} {'w2 r0':>8} {'w2 r1':>8} {'ratio':>6} "
    f"{'net w1':>7} {'net r0':>7} {'net r1':>7} {'ratio':>6}  w2 table MiB/rank  plan (world 2)"
)


def print_memory_row(row: dict, idle: float) -> None:
    w1 = row["world1"][0]["peak"]
    w2 = [r["peak"] for r in row["world2"]]
    net1, net2 = w1 - idle, [p - idle for p in w2]
    tables = " + ".join(f"{k} {v / 1e6:g}M" for k, v in row["big"].items())
    local = "/".join(f"{r['local_table_mib']:.0f}" for r in row["world2"])
    plan = "; ".join(line.split(": ", 1)[1].replace(" on ranks ", "@") for line in row["world2"][0]["plan"].splitlines()
                     if any(line.split(": ")[0].endswith("." + k) for k in row["big"]))
    print(f"{tables:<22} {row['sharding']:<14} {w1:8.0f} {w2[0]:8.0f} {w2[1]:8.0f} {max(w2) / w1:6.2f} "
          f"{net1:7.0f} {net2[0]:7.0f} {net2[1]:7.0f} {max(net2) / net1:6.2f}  {local:<17}  {plan}")


# ---- part b: throughput -----------------------------------------------------------------------------
WARMUP = 3


def throughput_worker(rank: int, world: int, port: int, out: str, impl: str, rows: int, steps: int,
                      batch_size: int, zipf: float, threads: int) -> None:
    init_process(rank, world, port, threads)
    import statistics

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from rec_dist.distributed.strategy import shard_model
    from rec_dist.embedding.collection import embedding_device
    from rec_dist.embedding.fused import SparseOptimizer, fuse_pooled_tables, fused_parameter_ids

    big = {"item": rows}
    schema = make_schema(big)
    batches = make_batches(schema, big, steps + WARMUP, batch_size, zipf, seed=0)
    torch.manual_seed(0)
    sparse = SparseOptimizer("adagrad", lr=0.05)
    optimizers = []
    if impl in ("plain", "sparse"):
        with embedding_device("meta"):
            model = make_model(schema)
        model.embeddings = plain_embeddings(schema, sparse=impl == "sparse")
        if impl == "sparse":
            tables = list(model.embeddings.parameters())
            optimizers.append(torch.optim.SparseAdam(tables, lr=1e-3))
    elif impl == "dmp":
        with embedding_device("meta"):
            model = make_model(schema)
        model, _ = shard_model(model, sparse, sharding_config(schema, "table_wise"), torch.device("cpu"), 1,
                               dist.group.WORLD)
    else:  # febc
        model = make_model(schema)
        fuse_pooled_tables(model, sparse)
    skip = fused_parameter_ids(model) | {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    optimizers.append(torch.optim.Adam([p for p in model.parameters() if id(p) not in skip], lr=1e-3, fused=True))
    losses, times = [], []
    for batch in batches:
        start = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(batch)["click"], batch.labels["click"])
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    timed = times[WARMUP:]
    dump(out, {"samples_per_s": batch_size / statistics.median(timed),
               "samples_per_s_mean": batch_size * len(timed) / sum(timed),
               "step_ms": [t * 1000 for t in times], "peak": peak_rss_mib(), "losses": losses})
    dist.destroy_process_group()


IMPLS = {
    "plain": "EmbeddingBag+dense Adam",
    "sparse": "EmbeddingBag(sparse)+SparseAdam",
    "dmp": "DMP w1 fused Adagrad",
    "febc": "FEBC fused Adagrad",
}


def run_throughput(args) -> dict:
    import statistics

    width = 14
    print(f"{'rows':>10} " + " ".join(f"{i:>{width}}" for i in args.impls)
          + "  " + " ".join(f"{i + '/plain':>11}" for i in args.impls if i != "plain")
          + "  peak RSS MiB " + "/".join(args.impls) + "   repeats (samples/s)")
    rows = []
    for n in args.rows:
        repeats: dict[str, list[dict]] = {impl: [] for impl in args.impls}
        for r in range(args.repeats):  # implementations alternate inside each repeat
            for impl in args.impls if r % 2 == 0 else args.impls[::-1]:
                repeats[impl].append(spawn(throughput_worker, 1, impl, n, args.timed_steps, args.batch_size,
                                           args.zipf, args.threads)[0])
        median = {i: statistics.median(c["samples_per_s"] for c in repeats[i]) for i in args.impls}
        peak = {i: max(c["peak"] for c in repeats[i]) for i in args.impls}
        rows.append({"rows": n, "median_samples_per_s": median, "peak_rss_mib": peak, "repeats": repeats})
        ratios = [f"{median[i] / median['plain']:10.1f}x" if "plain" in median else "          -"
                  for i in args.impls if i != "plain"]
        every = "; ".join(f"{i} " + ",".join(f"{c['samples_per_s']:.0f}" for c in repeats[i]) for i in args.impls)
        print(f"{n:>10,} " + " ".join(f"{median[i]:>{width},.0f}" for i in args.impls) + "  " + " ".join(ratios)
              + "  " + "/".join(f"{peak[i]:.0f}" for i in args.impls) + "   " + every)
        sys.stdout.flush()
    return {"rows": rows}


# ---- GPU (benchmarks/gpu_check.sh) ------------------------------------------------------------------
def gpu_worker(rank: int, world: int, port: int, out: str, device_type: str, sharding_type: str, kernel: str,
               rows: int, steps: int, batch_size: int, zipf: float) -> None:
    """One cell: ``shard_model`` on one device with a 1-process group (NCCL on cuda; gloo for a CPU dry run)."""
    init_process(rank, world, port, 4, backend="nccl" if device_type == "cuda" else "gloo")
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from rec_dist.distributed.planner import ShardingConfig, TableSharding
    from rec_dist.distributed.strategy import shard_model
    from rec_dist.embedding.collection import embedding_device
    from rec_dist.embedding.fused import SparseOptimizer, fused_parameter_ids

    cuda = device_type == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    big = {"item": rows}
    schema = make_schema(big)
    batches = [b.to(device) for b in make_batches(schema, big, steps + WARMUP, batch_size, zipf, seed=0)]
    torch.manual_seed(0)
    with embedding_device("meta"):
        model = make_model(schema)
    config = ShardingConfig(tables={"item": TableSharding([sharding_type], [kernel])})
    dmp, plan = shard_model(model, SparseOptimizer("adagrad", lr=0.05), config, device, 1, dist.group.WORLD)
    fused = fused_parameter_ids(dmp)
    dense = torch.optim.Adam([p for p in dmp.parameters() if id(p) not in fused], lr=1e-3)
    losses = []
    for i, batch in enumerate(batches):
        if i == WARMUP:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(dmp(batch)["click"], batch.labels["click"])
        dense.zero_grad()
        loss.backward()
        dense.step()
        losses.append(loss.detach())
    losses = [x.item() for x in losses]  # synchronises
    seconds = time.perf_counter() - start
    dump(out, {"sharding": sharding_type, "kernel": kernel, "rows": rows, "batch_size": batch_size,
               "steps": steps, "samples_per_s": steps * batch_size / seconds, "losses": losses, "plan": plan,
               "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "max_gpu_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None})
    dist.destroy_process_group()


def run_gpu(args) -> list[dict]:
    rows = args.rows[-1]
    print(f"GPU check on {args.gpu_device}: DCN-V2, item table {rows:,} x {DIM} (Zipf {args.zipf}) + small tables, "
          f"batch {args.batch_size}, {args.timed_steps} timed steps after {WARMUP} warm-up, 1-process group")
    results = []
    for cell in args.gpu_cells:
        sharding_type, kernel = cell.split(":")
        try:  # one process per cell: a kernel that fails does not take the others down
            result = spawn(gpu_worker, 1, args.gpu_device, sharding_type, kernel, rows, args.timed_steps,
                           args.batch_size, args.zipf)[0]
            print(f"{sharding_type:>12} / {kernel:<18} {result['samples_per_s']:>14,.0f} samples/s   losses "
                  f"{result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}   plan: {result['plan'].splitlines()[0]}",
                  flush=True)
        except RuntimeError as err:
            result = {"sharding": sharding_type, "kernel": kernel, "error": str(err)}
            print(f"{sharding_type:>12} / {kernel:<18} FAILED ({err}; traceback above)", flush=True)
        results.append(result)
    return results


# ---- main ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["memory", "throughput", "all"], default="all")
    parser.add_argument("--big-rows", type=int, default=20_000_000, help="memory: rows of the big table(s) in all")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--memory-threads", type=int, default=1, help="torch threads per rank (memory part)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000],
                        help="throughput: rows of the big table")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    parser.add_argument("--timed-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="throughput: repeats (fresh processes) per cell")
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch size")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (throughput part); 1: on a shared 2-core box 2 threads stall each other")
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids")
    parser.add_argument("--json", help="write every number of the run here")
    parser.add_argument("--gpu", action="store_true", help="the GPU check (benchmarks/gpu_check.sh) instead")
    parser.add_argument("--gpu-cells", nargs="+", default=["table_wise:fused", "table_wise:fused_uvm_caching",
                                                           "row_wise:fused", "row_wise:fused_uvm_caching"],
                        help="GPU check: sharding_type:compute_kernel of the big table, one process each")
    parser.add_argument("--gpu-device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: dry-run the GPU check's code on CPU (gloo; use --gpu-cells table_wise:fused)")
    args = parser.parse_args()

    out: dict = {"args": vars(args)}
    if args.gpu:
        out["gpu"] = run_gpu(args)
    if not args.gpu and args.part in ("memory", "all"):
        print(f"(a) peak RSS per rank, MiB (ru_maxrss); {args.memory_steps} training steps, global batch "
              f"{args.batch_size}, {args.memory_threads} thread(s) per rank; tables built on meta; "
              f"'net' = peak - idle process (same imports + gloo group)")
        print(MEMORY_HEADER)
        out["memory"] = run_memory(args)
        idle = out["memory"]["idle"]
        idle2 = "/".join(f"{r['peak']:.0f}" for r in idle[2])
        print(f"idle process peak RSS: world 1 {idle[1][0]['peak']:.0f}, world 2 {idle2} MiB (the 'net' columns "
              f"subtract {out['memory']['idle_peak_mib']:.0f})")
        print("ratio = max rank at world 2 / world 1 (target <= 0.6)\n")
    if not args.gpu and args.part in ("throughput", "all"):
        print(f"(b) training samples/s (batch / median step time), one process, {args.threads} threads, batch "
              f"{args.batch_size}, {args.timed_steps} timed steps after {WARMUP} warm-up, Zipf {args.zipf} ids, "
              f"median of {args.repeats} repeat(s)")
        out["throughput"] = run_throughput(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
