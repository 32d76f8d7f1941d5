"""Amazon Beauty preparation: the pinned file, leave-one-out rows against a per-user loop, the CLI on a slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rec_dist.data.amazon_beauty import BEAUTY_SHA256, prepare_amazon_beauty, read_beauty
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError

REPO = Path(__file__).resolve().parents[1]
BEAUTY = REPO.parent / "shared" / "datasets" / "amazon-beauty" / "beauty.txt"


@pytest.fixture(scope="module")
def beauty_slice(tmp_path_factory) -> Path:
    """The first 150 users of the real file (their raw ids are sparse among the corpus's: renumbered)."""
    lines = BEAUTY.read_text().splitlines()
    users = np.array([int(line.split()[0]) for line in lines])
    keep = [line for line, user in zip(lines, users, strict=True) if user <= 150]
    root = tmp_path_factory.mktemp("beauty_src")
    (root / "beauty.txt").write_text("\n".join(keep) + "\n")
    return root


def test_real_file_matches_the_pin_and_the_readme():
    user, item = read_beauty(BEAUTY, BEAUTY_SHA256)
    assert (len(user), len(np.unique(user)), len(np.unique(item))) == (353_962, 40_226, 54_542)
    assert (user.max(), item.max()) == (40_226, 54_542)  # already 1..N: renumbering is the identity


def test_wrong_checksum_and_bad_lines_name_the_file(tmp_path, beauty_slice):
    with pytest.raises(DataError, match=r"beauty\.txt: sha256 .* differs from the pinned"):
        prepare_amazon_beauty(tmp_path / "out", beauty_slice)  # a slice is not the pinned file
    (tmp_path / "beauty.txt").write_text("1 2\n1 x\n")
    with pytest.raises(DataError, match=r"beauty\.txt: every line must be two integers"):
        read_beauty(tmp_path / "beauty.txt", None)
    (tmp_path / "beauty.txt").write_text("1 2\n2 3\n1 4\n")
    with pytest.raises(DataError, match="interleaved"):
        read_beauty(tmp_path / "beauty.txt", None)
    with pytest.raises(DataError, match="no such file"):
        prepare_amazon_beauty(tmp_path / "out", tmp_path / "nowhere")


def test_leave_one_out_rows_match_a_per_user_loop(tmp_path, beauty_slice):
    max_history = 3
    out = prepare_amazon_beauty(tmp_path, beauty_slice, max_history=max_history, sha256=None)
    sequences: dict[int, list[int]] = {}
    for line in (beauty_slice / "beauty.txt").read_text().splitlines():
        user, item = (int(x) for x in line.split())
        sequences.setdefault(user, []).append(item)
    raw_items = sorted({i for seq in sequences.values() for i in seq})
    new_item = {raw: k + 1 for k, raw in enumerate(raw_items)}
    expected: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for new_user, raw_user in enumerate(sorted(sequences), start=1):
        seq = [new_item[i] for i in sequences[raw_user]]
        for pos, item in enumerate(seq):
            split = "test" if pos == len(seq) - 1 else "val" if pos == len(seq) - 2 else "train"
            expected[split].append({"user_id": new_user, "item_id": item,
                                    "hist_item_id": seq[max(0, pos - max_history):pos], "like": 1.0,
                                    "position": pos})
    for split, rows in expected.items():
        assert pq.read_table(out / "retrieval" / f"{split}.parquet").to_pylist() == rows
    assert pq.read_table(out / "items.parquet").column("item_id").to_pylist() == list(range(1, len(raw_items) + 1))
    schema = Schema.load(out / "schema.yaml")
    assert schema.tables["item"].num_embeddings == len(raw_items) + 1
    assert schema.groups["history"] == ("hist_item_id",) and schema.feature("hist_item_id").max_len == max_history
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["retrieval/test"]["rows"] == len(sequences) == 150


@pytest.mark.parametrize("config", ["two_tower", "gru4rec"])
def test_cli_prepare_and_the_beauty_configs_on_a_slice(tmp_path, beauty_slice, config):
    """`rec-dist data prepare amazon-beauty` checks the pin; each shipped Beauty config builds on the prepared
    data and validates over the full (slice) corpus."""
    from rec_dist.data.cli import prepare
    from rec_dist.lightning_cli import build_cli_class

    with pytest.raises(DataError, match="differs from the pinned"):
        prepare("amazon-beauty", str(tmp_path / "data"), source_dir=str(beauty_slice))
    prepare_amazon_beauty(tmp_path / "data", beauty_slice, sha256=None)  # the data module reuses it
    cli = build_cli_class()(args=[
        "--config", str(REPO / f"configs/beauty/{config}.yaml"), "--data.init_args.data_dir", str(tmp_path / "data"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ], run=False)
    result = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert cli.datamodule.item_table().num_items == cli.datamodule.schema.tables["item"].num_embeddings - 1
    for name in ("val/recall_at_10", "val/ndcg_at_50", "val/popularity/recall_at_10"):
        assert 0.0 <= result[name] <= 1.0
