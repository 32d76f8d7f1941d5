"""LightningDataModules over parquet splits described by a schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from rec_dist.data.histories import HistorySpec, HistoryTable
from rec_dist.data.items import ItemTable
from rec_dist.data.parquet import ParquetBatches, list_parquet, loader_kwargs
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError


def training_epoch(trainer: pl.Trainer, batches_per_epoch: int) -> int:
    """The epoch a training pass starting now belongs to, from the batches already trained.

    ``trainer.current_epoch`` lags by one when a run resumes from a checkpoint
    written at validation end (Lightning counts that epoch as unfinished); the
    restored batch counter does not.
    """
    per_epoch = trainer.num_training_batches  # not yet known when the first pass starts
    per_epoch = batches_per_epoch if per_epoch in (0, float("inf")) else per_epoch
    if not per_epoch:
        return trainer.current_epoch
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready // per_epoch)


class EpochLoader(DataLoader):
    """A DataLoader that tells its dataset which epoch each new pass is.

    Lightning calls ``set_epoch`` only on samplers, and an IterableDataset has
    none. ``epoch_of`` (``training_epoch`` of the trainer, read when a pass
    starts, so a resumed run replays the right shuffle) gives the epoch;
    without it passes are counted from 0.
    """

    def __init__(self, dataset: ParquetBatches, epoch_of: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_of = epoch_of
        self.passes = 0

    def __iter__(self):
        self.dataset.set_epoch(self.epoch_of() if self.epoch_of is not None else self.passes)
        self.passes += 1
        return super().__iter__()


class ParquetDataModule(pl.LightningDataModule):
    """Train/val/test/predict splits as parquet, one schema.

    Paths are files, directories of ``*.parquet`` or globs, relative to the
    schema file's directory. ``features`` restricts the schema (and what is
    read from disk) to those columns. ``predict`` defaults to the test split.
    Rows are split evenly over ranks and ``num_workers`` loader processes.
    ``embedding_dim`` overrides the schema's table dims (one int for every table,
    or ``{table: dim}``), so a config or a tuning space can change them.
    Only the columns the task reads are read from disk: when the trainer's
    LightningModule has ``input_columns()`` (model inputs, labels, id columns),
    the loaders read and check those alone.
    ``items`` names the item table (``items.parquet``: the item id column and
    the schema's ``item`` group); ``item_table()`` loads it once.

    Histories come in two layouts. Row copy (the default; MovieLens): each row
    holds its own history as ``list<int64>`` columns. Stored once (the schema's
    ``histories`` block, see ``rec_dist.data.histories``): ``histories.parquet``
    holds each user's events once, oldest first, and each row carries the user
    id and ``history_end`` (how many of the user's events precede it); the
    batch's sequence is the last ``max_len`` events before that end, sliced when
    the batch is built. Per-event side features may be list columns of the
    history table or joined from the item table (``from_items``). The history
    table is loaded once per process, before loader workers start.
    """

    def __init__(
        self,
        schema_path: str,
        train: str | None = "train.parquet",
        val: str | None = "val.parquet",
        test: str | None = "test.parquet",
        predict: str | None = None,
        batch_size: int = 4096,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer_rows: int = 1 << 20,
        seed: int = 0,
        features: list[str] | None = None,
        embedding_dim: int | dict[str, int] | None = None,
        items: str | None = None,
    ) -> None:
        super().__init__()
        self.items = items
        self._item_table: ItemTable | None = None
        self.schema_path = Path(schema_path)
        self.schema = Schema.load(self.schema_path)
        self.history_spec = HistorySpec.from_schema(self.schema, self.schema_path.parent)
        self._history_schema = self.schema
        self._history_tables: dict[tuple[str, ...], HistoryTable] = {}
        if features is not None:
            self.schema = self.schema.select(features)
        if embedding_dim is not None:
            self.schema = self.schema.with_embedding_dims(embedding_dim, "data.init_args.embedding_dim")
        self.splits = {"train": train, "val": val, "test": test, "predict": predict}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.seed = seed
        self._datasets: dict[str, ParquetBatches] = {}

    def item_table(self) -> ItemTable:
        """The item table (``items``, relative to the schema file), loaded once (the retrieval corpus)."""
        if self.items is None:
            raise DataError(f"{type(self).__name__}: no item table configured (data.init_args.items)")
        if self._item_table is None:
            path = Path(self.items)
            path = path if path.is_absolute() else self.schema_path.parent / path
            self._item_table = ItemTable.load(path, self.schema)
        return self._item_table

    def history_table(self, features: list[str] | None = None) -> HistoryTable | None:
        """The per-user history table (schema ``histories``) holding ``features`` (None: all read ones), loaded
        once; None in the row-copy layout or when no stored-once sequence is read."""
        spec = self.history_spec
        if spec is None:
            return None
        read = self.schema.features if features is None else features
        wanted = tuple(f for f in spec.features if f in read)
        if not wanted:
            return None
        if wanted not in self._history_tables:
            items = self.item_table() if any(f in spec.from_items for f in wanted) and self.items else None
            self._history_tables[wanted] = HistoryTable.load(spec, self._history_schema, items, wanted)
        return self._history_tables[wanted]

    def split_files(self, split: str) -> list[str]:
        spec = self.splits[split]
        if spec is None:
            raise ValueError(f"no {split!r} split configured (data.init_args.{split})")
        return list_parquet(spec, root=self.schema_path.parent)

    def dataset(self, split: str) -> ParquetBatches:
        if split == "predict" and self.splits["predict"] is None:
            split = "test"
        if split not in self._datasets:
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            training = split == "train"
            columns = self.input_columns()
            self._datasets[split] = ParquetBatches(
                self.split_files(split),
                self.schema,
                batch_size=self.batch_size if training else self.eval_batch_size,
                shuffle=training,
                shuffle_buffer_rows=self.shuffle_buffer_rows,
                seed=self.seed,
                rank=rank,
                world_size=world,
                num_workers=self.num_workers,
                equal_batches="min" if training else "max",
                labels=split != "predict",
                columns=columns,
                history=self.history_table(columns),
            )
        return self._datasets[split]

    def input_columns(self) -> list[str] | None:
        """The columns the attached task reads (its ``input_columns()``); None (all) without one."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        ask = getattr(module, "input_columns", None)
        return list(ask()) if callable(ask) else None

    def _loader(self, split: str) -> DataLoader:
        kwargs = loader_kwargs(self.num_workers)
        if split != "train":
            return DataLoader(self.dataset(split), **kwargs)
        kwargs["persistent_workers"] = False  # workers re-created per epoch so the epoch reaches them
        trainer = self.trainer
        dataset = self.dataset(split)
        epoch_of = (lambda: training_epoch(trainer, len(dataset))) if trainer is not None else None
        return EpochLoader(dataset, epoch_of, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class MovieLens100k(ParquetDataModule):
    """MovieLens-100k, prepared on first use (``rec-dist data prepare movielens-100k``).

    ``split: ranking`` is the global time split (80/10/10 by timestamp);
    ``split: retrieval`` the per-user leave-last-out split.
    """

    def __init__(
        self,
        data_dir: str = "data",
        split: str = "ranking",
        batch_size: int = 4096,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer_rows: int = 1 << 20,
        seed: int = 0,
        features: list[str] | None = None,
        embedding_dim: int | dict[str, int] | None = None,
    ) -> None:
        from rec_dist.data.movielens import ITEMS_FILE, prepare_movielens_100k

        if split not in ("ranking", "retrieval"):
            raise ValueError(f"data.init_args.split must be 'ranking' or 'retrieval', got {split!r}")
        root = prepare_movielens_100k(data_dir)
        super().__init__(
            schema_path=str(root / "schema.yaml"),
            train=f"{split}/train.parquet",
            val=f"{split}/val.parquet",
            test=f"{split}/test.parquet",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            shuffle_buffer_rows=shuffle_buffer_rows,
            seed=seed,
            features=features,
            embedding_dim=embedding_dim,
            items=ITEMS_FILE,
        )
