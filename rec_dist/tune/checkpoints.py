"""Which checkpoint a Ray job means: resolve ``--ckpt_path`` before any worker starts, and find a run's
checkpoints to print at the end of a train job.

A Ray Train run directory (``<storage_path>/<run name>/``) holds one ``checkpoint_<timestamp>`` folder per
reported epoch (each with the Lightning checkpoint ``checkpoint.ckpt`` inside: a file, or a directory of
torch.distributed.checkpoint shards for the torchrec strategy), Ray's own
``checkpoint_manager_snapshot.json``, and ``lightning/``, where the config's ``ModelCheckpoint`` callbacks
write ``best-epoch=N.ckpt`` and ``last.ckpt``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from rec_dist.distributed.strategy import LIGHTNING_STATE  # the non-sharded part of a torchrec-strategy checkpoint
from rec_dist.errors import RecDistError

CHECKPOINT_NAME = "checkpoint.ckpt"  # what RayTrainReportCallback writes inside each Ray checkpoint
ACCEPTED = ("a Ray run directory (with checkpoint_* folders), a Ray checkpoint folder (with checkpoint.ckpt), "
            "a torchrec-strategy checkpoint directory (with lightning.pt) or a Lightning .ckpt file")


def ray_checkpoints(run_dir: Path) -> list[Path]:
    """The Ray checkpoints of a run directory, oldest first (their names end in a sortable timestamp)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and (p / CHECKPOINT_NAME).exists())


def resolve_checkpoint(path: str, flag: str = "--ckpt_path") -> Path:
    """The Lightning checkpoint ``path`` names, checked on the driver (a bad path fails at once, not after
    the workers have started): a run directory gives its latest checkpoint; a Ray checkpoint folder the
    ``checkpoint.ckpt`` inside it. Raises RecDistError naming ``flag`` and what is accepted."""
    given = Path(path).expanduser()
    if not given.exists():
        raise RecDistError(f"{flag} {path}: no such file or directory; expected {ACCEPTED}")
    ckpt = given
    if ckpt.is_dir() and not (ckpt / CHECKPOINT_NAME).exists():
        found = ray_checkpoints(ckpt)
        if found:
            print(f"{flag} {path} is a Ray run directory: using its latest checkpoint {found[-1].name}")
            ckpt = found[-1]
    if ckpt.is_dir() and (ckpt / CHECKPOINT_NAME).exists():
        ckpt = ckpt / CHECKPOINT_NAME
    if ckpt.is_dir():
        if (ckpt / LIGHTNING_STATE).is_file():
            return ckpt.resolve()
        raise RecDistError(f"{flag} {path}: a directory without checkpoints; expected {ACCEPTED}")
    if not zipfile.is_zipfile(ckpt):  # torch.save writes a zip archive
        raise RecDistError(f"{flag} {path}: not a checkpoint (not a torch.save file); expected {ACCEPTED}")
    return ckpt.resolve()


def lightning_checkpoints(checkpoint_root: str | None, run_id: str) -> dict[str, Path]:
    """``{"best": ..., "last": ...}`` of the run's ModelCheckpoint folder under ``checkpoint_root``
    (``<root>/<experiment id>/<run id>/checkpoints``); the keys that exist."""
    if not checkpoint_root:
        return {}
    found: dict[str, Path] = {}
    for folder in sorted(Path(checkpoint_root).glob(f"*/{run_id}/checkpoints")):
        best = sorted(folder.glob("best-*"), key=lambda p: p.stat().st_mtime)
        if best:
            found["best"] = best[-1]
        if (folder / "last.ckpt").exists():
            found["last"] = folder / "last.ckpt"
    return found
