"""ComiRec's controllable aggregation at serving (Cen et al. 2020, eq. 10-11): accuracy against diversity as
lambda grows, for a trained multi-interest checkpoint on MovieLens-100k's test split.

For each test user, N items are chosen greedily from the union of its interests' top-N lists
(``rec_dist.layers.multi_interest.controllable_aggregation``; the user's train + val items excluded), a
category being the item's ``primary_genre``. Reported per lambda: HR@N (the held-out item among the N) and
ComiRec's diversity (the share of pairs of chosen items from different categories). One run, no claims.

    python benchmarks/multi_interest_aggregation.py --config configs/movielens/comirec_sa.yaml \
        --ckpt /tmp/multi_interest_movielens/comirec_sa/checkpoints/best-....ckpt
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
import torch

from rec_dist.data.interactions import SeenItems
from rec_dist.layers.multi_interest import controllable_aggregation
from rec_dist.lightning_cli import build_cli_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.5, 1.0])
    parser.add_argument("--category", default="primary_genre")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cli = build_cli_class()(args=["--config", args.config, "--trainer.logger", "false"], run=False)
    task, data = cli.model, cli.datamodule
    task.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=False)["state_dict"])
    model = task.model.eval()
    table = data.item_table()
    items_file = pq.read_table(data.schema_path.parent / data.items, columns=[task.item_column, args.category])
    order = np.argsort(items_file[task.item_column].to_numpy())
    assert np.array_equal(items_file[task.item_column].to_numpy()[order], table.ids)
    categories = torch.from_numpy(items_file[args.category].to_numpy()[order])
    ids = torch.from_numpy(table.ids)
    seen = SeenItems.from_parquet(data.split_files("train") + data.split_files("val"), task.user_column,
                                  task.item_column)
    hits = {lam: 0 for lam in args.lambdas}
    diversity = {lam: 0.0 for lam in args.lambdas}
    users = 0
    with torch.no_grad():
        items = model.encode_item(table.batch(table.ids))  # (N, D)
        for batch in data.dataset("test"):
            queries = model.encode_query(batch)  # (B, K, D): absent interests filled with the first
            targets = batch.ids(task.item_column)
            exclude = seen.of(batch.ids(task.user_column))
            users += targets.shape[0]
            for lam in args.lambdas:
                chosen, _ = controllable_aggregation(queries, items, ids, categories, args.n, lam, exclude)
                hits[lam] += int((chosen == targets.unsqueeze(1)).any(1).sum())
                cats = categories[torch.searchsorted(ids, chosen.clamp(min=int(ids[0])))]  # (B, n)
                differ = (cats.unsqueeze(2) != cats.unsqueeze(1)).float()  # (B, n, n)
                n = chosen.shape[1]
                diversity[lam] += float((differ.sum((1, 2)) / (n * (n - 1))).sum())
    print(f"{type(model).__name__}, {users} test users, N = {args.n}, categories: {args.category}")
    print("| lambda | HR@N | diversity |")
    print("|---|---|---|")
    for lam in args.lambdas:
        print(f"| {lam:g} | {hits[lam] / users:.4f} | {diversity[lam] / users:.4f} |")


if __name__ == "__main__":
    main()
