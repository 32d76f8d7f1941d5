"""What a Ray job is told before any worker starts: which checkpoint ``--ckpt_path`` means, and whether
its MLflow store lies in Ray's temporary copy of the working directory (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rec_dist.errors import RecDistError
from rec_dist.tune.checkpoints import lightning_checkpoints, resolve_checkpoint
from rec_dist.tune.ray_train import absolute_tracking_uri, temporary_store_warning


def _ray_run_dir(root: Path) -> Path:
    """A Ray Train run directory as Ray 2.60 lays it out: timestamped checkpoints and Ray's snapshot."""
    run = root / "deepfm-fit-1234abcd"
    for stamp in ("2026-12-02_10-00-01.000001", "2026-12-02_10-00-09.000002"):
        ckpt = run / f"checkpoint_{stamp}" / "checkpoint.ckpt"  # a torchrec-strategy checkpoint: a directory
        ckpt.mkdir(parents=True)
        torch.save({"epoch": 0}, ckpt / "lightning.pt")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    return run


def test_a_run_directory_gives_its_latest_checkpoint(tmp_path, capsys):
    run = _ray_run_dir(tmp_path)
    latest = run / "checkpoint_2026-12-02_10-00-09.000002" / "checkpoint.ckpt"
    assert resolve_checkpoint(str(run)) == latest.resolve()
    assert "using its latest checkpoint checkpoint_2026-12-02_10-00-09.000002" in capsys.readouterr().out
    assert resolve_checkpoint(str(latest.parent)) == latest.resolve()  # a Ray checkpoint folder
    assert resolve_checkpoint(str(latest)) == latest.resolve()  # the torchrec checkpoint itself
    single = tmp_path / "best.ckpt"
    torch.save({"epoch": 1}, single)
    assert resolve_checkpoint(str(single)) == single.resolve()


def test_what_is_not_a_checkpoint_fails_before_the_workers_start(tmp_path):
    run = _ray_run_dir(tmp_path)
    snapshot = run / "checkpoint_manager_snapshot.json"  # what `ls -d .../checkpoint_*` also lists
    with pytest.raises(RecDistError, match=r"--ckpt_path .*checkpoint_manager_snapshot\.json: not a checkpoint"):
        resolve_checkpoint(str(snapshot))
    with pytest.raises(RecDistError, match=r"--ckpt_path .*nowhere: no such file or directory; expected a Ray run"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(RecDistError, match="a directory without checkpoints"):
        resolve_checkpoint(str(tmp_path))


def test_lightning_checkpoints_of_a_run(tmp_path):
    folder = tmp_path / "lightning" / "3" / "run123" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("best-epoch=1.ckpt", "last.ckpt", "latest-epoch=2.ckpt"):
        (folder / name).write_text("x")
    assert lightning_checkpoints(str(tmp_path / "lightning"), "run123") == {
        "best": folder / "best-epoch=1.ckpt", "last": folder / "last.ckpt"}
    assert lightning_checkpoints(str(tmp_path / "lightning"), "other") == {}
    assert lightning_checkpoints(None, "run123") == {}


def test_store_warning_only_for_a_store_inside_rays_copy(tmp_path):
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    copy.mkdir(parents=True)
    outside = f"sqlite:///{tmp_path}/mlruns.db"  # the README's absolute path: no warning (it used to warn)
    assert temporary_store_warning(outside, str(copy)) is None
    inside = absolute_tracking_uri(f"sqlite:///{copy}/mlruns.db")
    assert "lies in Ray's temporary copy" in temporary_store_warning(inside, str(copy))
    assert temporary_store_warning(inside, str(tmp_path)) is None  # not inside a Ray job
    assert temporary_store_warning("http://127.0.0.1:5000", str(copy)) is None
