"""rec_dist's DeepFM throughput table (``benchmarks/throughput.py``) at two revisions, side by side.

    .venv/bin/python benchmarks/compare_revisions.py --old f7ea954 [--repeats 3] [--batch-sizes 1024 4096 16384]

Why: a refactor must not slow training down, and numbers from another day
are not comparable on a shared machine. The old revision is checked out in
a temporary git worktree and both run ``throughput.py`` (rec_dist only, no
peers) with the same venv, alternating old / new in every repeat so that
load drifts hit both alike; each revision prepares MovieLens in its own data
directory. Prints, per set-up and batch size, the median samples/s of each
and new / old, and the test AUCs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, data_dir: Path, batch_sizes: list[int], out: Path) -> list[dict]:
    cmd = [sys.executable, str(tree / "benchmarks" / "throughput.py"), "--peers", "--repeats", "1",
           "--data-dir", str(data_dir), "--json", str(out), "--batch-sizes", *map(str, batch_sizes)]
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's rec_dist before the editable install's
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())  # one record per set-up and batch size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the revision to compare against (e.g. the commit before a port)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="rec_dist_compare_") as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for repeat in range(args.repeats):
                for name, tree in (("old", old_tree), ("new", ROOT)):
                    out = Path(tmp) / f"{name}-{repeat}.json"
                    results[name] += run(tree, Path(tmp) / f"data-{name}", args.batch_sizes, out)
                    print(f"repeat {repeat + 1}/{args.repeats}: {name} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    print("| set-up | batch | old samples/s (median) | new samples/s (median) | new / old | old AUC | new AUC |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    keys = sorted({(r["library"], r["batch_size"]) for r in results["new"]}, key=lambda k: (k[1], k[0]))
    for library, batch in keys:
        cells = {name: [r for r in rows if (r["library"], r["batch_size"]) == (library, batch)]
                 for name, rows in results.items()}
        speed = {name: statistics.median(r["samples_per_second"] for r in rows) for name, rows in cells.items()}
        auc = {name: statistics.median(r["test_auc"] for r in rows) for name, rows in cells.items()}
        print(f"| {library.removeprefix('rec_dist ')} | {batch} | {speed['old']:,.0f} | {speed['new']:,.0f} | "
              f"{speed['new'] / speed['old']:.3f} | {auc['old']:.4f} | {auc['new']:.4f} |")


if __name__ == "__main__":
    main()
