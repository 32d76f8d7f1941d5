"""Embedding lookup + backward + update per step: TorchRec EmbeddingBagCollection with dense
Adam (what plain training does) vs FusedEmbeddingBagCollection with Adagrad fused into the
backward (``model.init_args.sparse_optimizer``).

    .venv/bin/python benchmarks/embedding_step.py [--batch-size 16384] [--rows 944 1683 ...]

Default tables: the 10 single-id MovieLens-100k features (dim 16). ``--rows 1000000 ...``
shows the large-vocabulary case, where the dense optimizer touches every row each step.
"""

from __future__ import annotations

import argparse
import time

import torch

from rec_dist.embedding.fused import SparseOptimizer, fuse_pooled_tables
from rec_dist.quiet import quiet_startup

MOVIELENS_ROWS = [944, 1683, 3, 8, 22, 12, 20, 11, 25, 8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--rows", type=int, nargs="+", default=MOVIELENS_ROWS)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_startup()
    torch.set_num_threads(args.threads)

    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = [f"f{i}" for i in range(len(args.rows))]
    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=args.dim, feature_names=[keys[i]])
        for i, n in enumerate(args.rows)
    ]
    generator = torch.Generator().manual_seed(0)
    batches = [
        KeyedJaggedTensor(
            keys=keys,
            values=torch.cat([torch.randint(0, n, (args.batch_size,), generator=generator) for n in args.rows]),
            lengths=torch.ones(args.batch_size * len(keys), dtype=torch.int32),
        )
        for _ in range(args.steps)
    ]

    def ms_per_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> float:
        for warm_up in (True, False):
            start = time.perf_counter()
            for batch in batches[:3] if warm_up else batches:
                module(batch).values().sum().backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad()
        return (time.perf_counter() - start) / len(batches) * 1000

    plain = EmbeddingBagCollection(tables=tables)
    dense_ms = ms_per_step(plain, torch.optim.Adam(plain.parameters(), lr=1e-3))

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=tables)

        def forward(self, batch):
            return self.ebc(batch)

    fused = Holder()
    fuse_pooled_tables(fused, SparseOptimizer("adagrad", lr=0.01))
    fused_ms = ms_per_step(fused, None)
    print(f"tables {len(args.rows)} (rows {args.rows[:4]}...), dim {args.dim}, batch {args.batch_size}")
    print(f"EmbeddingBagCollection + dense Adam : {dense_ms:7.2f} ms/step")
    print(f"fused Adagrad (FBGEMM TBE)          : {fused_ms:7.2f} ms/step   ({dense_ms / fused_ms:.2f}x faster)")


if __name__ == "__main__":
    main()
