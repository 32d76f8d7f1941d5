"""``rec-dist data``: prepare public datasets, synthesise logs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rec_dist.data.synth import SynthConfig
from rec_dist.errors import RecDistError


def prepare(dataset: str, data_dir: str = "data", source_dir: str | None = None, force: bool = False) -> None:
    """Prepare a dataset into ``data_dir/<dataset>/`` (canonical parquet + schema.yaml).

    Args:
        dataset: name of the dataset; one of: movielens-100k, movielens-100k-mt (multi-task click / like
            exposures built from movielens-100k; see rec_dist.data.movielens_multitask), amazon-beauty
            (leave-one-out; see rec_dist.data.amazon_beauty).
        data_dir: cache directory the prepared dataset is written to.
        source_dir: a local directory holding the raw files (tried first; amazon-beauty: the directory
            of beauty.txt, default ../shared/datasets/amazon-beauty).
        force: prepare again even if the output exists.
    """
    if dataset == "movielens-100k-mt":
        from rec_dist.data.movielens_multitask import prepare_movielens_100k_multitask

        out = prepare_movielens_100k_multitask(data_dir, source_dir=source_dir, force=force)
        print(f"prepared {dataset} in {out}")
        return
    if dataset == "amazon-beauty":
        from rec_dist.data.amazon_beauty import DEFAULT_SOURCE_DIR, prepare_amazon_beauty

        out = prepare_amazon_beauty(data_dir, source_dir or DEFAULT_SOURCE_DIR, force=force)
        print(f"prepared {dataset} in {out}")
        return
    if dataset != "movielens-100k":
        raise RecDistError(f"unknown dataset {dataset!r}; known: movielens-100k, movielens-100k-mt, amazon-beauty")
    from rec_dist.data.movielens import prepare_movielens_100k

    out = prepare_movielens_100k(data_dir, source_dir=source_dir, force=force)
    print(f"prepared {dataset} in {out}")


def synth(out_dir: str, settings: SynthConfig | None = None, force: bool = False) -> None:
    """Generate a synthetic log with planted signal into ``out_dir`` (parquet + schema.yaml).

    Args:
        out_dir: output directory.
        settings: generator settings (rows, users, items, sequence length, seed ...); not named
            ``config``, which jsonargparse reserves for config files.
        force: overwrite an existing output.
    """
    from rec_dist.data.synth import synthesize

    out = synthesize(Path(out_dir), settings or SynthConfig(), force=force)
    print(f"wrote synthetic data to {out}")


def main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        auto_cli({"prepare": prepare, "synth": synth}, args=argv, as_positional=True)
    except RecDistError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
