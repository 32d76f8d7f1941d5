"""Evaluator speed: users/s of full-corpus top-50 over 1,000,000 items (64-d), rec_dist against baselines.

    .venv/bin/python benchmarks/evaluator_speed.py [--items 1000000] [--users 1024] [--threads 2]

One run of each, on the same random unit vectors (inner product):
  - rec_dist top_items: chunks of ``--chunk`` items, each chunk's top-k merged into a running top-k
    (memory B x chunk, whatever the corpus size); also with 10 seen items excluded per user;
  - rec_dist target_ranks: the pessimistic rank of one target per user (what validation runs);
  - naive: ``torch.topk`` over the full score matrix of a batch of ``--naive_batch`` users (B x N floats);
  - FAISS ``IndexFlatIP.search`` (exact, BLAS + heaps).
torch and FAISS get the same number of threads (``--faiss_threads`` to change FAISS's). Every method's
top-50 ids are checked against FAISS's.
"""

from __future__ import annotations

import argparse
import platform
import time

import faiss
import torch

from rec_dist.metrics.retrieval import target_ranks, top_items


def timed(fn, users: int, batch: int) -> tuple[float, list]:
    """users/s of ``fn(start, stop)`` over all users in batches, and its outputs."""
    outputs = []
    start = time.perf_counter()
    for lo in range(0, users, batch):
        outputs.append(fn(lo, min(lo + batch, users)))
    return users / (time.perf_counter() - start), outputs


def overlap(found: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean |found ∩ reference| / k over users (near-tied scores may swap places at the k-th position)."""
    per_user = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, reference, strict=True)]
    return sum(per_user) / (len(per_user) * found.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512, help="users per call of rec_dist and FAISS")
    parser.add_argument("--naive_batch", type=int, default=256, help="users per full score matrix (B x N floats)")
    parser.add_argument("--chunk", type=int, default=65_536, help="items per scored chunk (rec_dist)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--faiss_threads", type=int, default=None, help="FAISS's OpenMP threads (default: --threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss_threads = args.faiss_threads or args.threads
    faiss.omp_set_num_threads(faiss_threads)
    gen = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(args.items, args.dim, generator=gen), dim=1)  # (N, d)
    ids = torch.arange(1, args.items + 1)  # (N,) no padding id in the corpus
    query = torch.nn.functional.normalize(torch.randn(args.users, args.dim, generator=gen), dim=1)  # (U, d)
    targets = torch.randint(1, args.items + 1, (args.users,), generator=gen)
    seen = torch.randint(1, args.items + 1, (args.users, 10), generator=gen)  # 10 seen items per user
    index = faiss.IndexFlatIP(args.dim)
    index.add(items.numpy())
    print(f"{args.items:,} items x {args.dim} d, {args.users} users, top-{args.k}, torch {args.threads} / FAISS "
          f"{faiss_threads} threads "
          f"(torch {torch.__version__}, faiss {faiss.__version__}, {platform.processor() or platform.machine()})")

    def ours(lo, hi):
        return top_items(query[lo:hi], items, ids, args.k, chunk_size=args.chunk)[0]

    def ours_seen(lo, hi):
        exclude = (torch.arange(0, (hi - lo) * 10 + 1, 10), seen[lo:hi].flatten())
        return top_items(query[lo:hi], items, ids, args.k, exclude, chunk_size=args.chunk)[0]

    def ranks(lo, hi):
        return target_ranks(query[lo:hi], items, ids, targets[lo:hi], chunk_size=args.chunk)

    def naive(lo, hi):
        return ids[(query[lo:hi] @ items.T).topk(args.k, dim=1).indices]  # (B, N) scores at once

    def flat(lo, hi):
        return torch.from_numpy(index.search(query[lo:hi].numpy(), args.k)[1]) + 1

    results = {}
    for name, fn, batch in (("rec_dist top_items", ours, args.batch), ("FAISS IndexFlatIP", flat, args.batch),
                            (f"naive torch.topk ({args.naive_batch} x N matrix)", naive, args.naive_batch),
                            ("rec_dist top_items, 10 seen excluded", ours_seen, args.batch),
                            ("rec_dist target_ranks (eval)", ranks, args.batch)):
        rate, out = timed(fn, args.users, batch)
        results[name] = (rate, torch.cat(out))
        print(f"  measured {name}: {rate:.1f} users/s", flush=True)
    reference = results["FAISS IndexFlatIP"][1]
    flat_rate = results["FAISS IndexFlatIP"][0]
    print(f"\n| method | users/s | x FAISS flat | top-{args.k} overlap with FAISS's |")
    print("|---|---:|---:|---:|")
    for name, (rate, out) in results.items():
        same = "-" if out.shape != reference.shape else f"{overlap(out, reference):.4f}"
        if "seen" in name:
            same = "- (excludes items)"
        print(f"| {name} | {rate:.1f} | {rate / flat_rate:.2f} | {same} |")
    print(f"\nmedian target rank {int(results['rec_dist target_ranks (eval)'][1].median())} of {args.items:,} "
          f"(random vectors: about N / 2)")


if __name__ == "__main__":
    main()
