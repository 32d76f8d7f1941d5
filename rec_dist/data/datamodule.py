"""LightningDataModules over parquet splits described by a schema."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from rec_dist.data.parquet import ParquetBatches, list_parquet, loader_kwargs
from rec_dist.data.schema import Schema


class ParquetDataModule(pl.LightningDataModule):
    """Train/val/test/predict splits as parquet, one schema.

    Paths are files, directories of ``*.parquet`` or globs, relative to the
    schema file's directory. ``features`` restricts the schema (and what is
    read from disk) to those columns. ``predict`` defaults to the test split. Row groups are sharded over ranks (equal batch
    counts per rank when training) and over ``num_workers`` loader processes.
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
    ) -> None:
        super().__init__()
        self.schema_path = Path(schema_path)
        self.schema = Schema.load(self.schema_path)
        if features is not None:
            self.schema = self.schema.select(features)
        self.splits = {"train": train, "val": val, "test": test, "predict": predict}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.seed = seed
        self._datasets: dict[str, ParquetBatches] = {}

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
            )
        dataset = self._datasets[split]
        if split == "train" and self.trainer is not None:
            dataset.set_epoch(self.trainer.current_epoch)
        return dataset

    def _loader(self, split: str) -> DataLoader:
        # Workers are re-created per epoch so that set_epoch reaches them.
        kwargs = loader_kwargs(self.num_workers)
        if split == "train":
            kwargs["persistent_workers"] = False
        return DataLoader(self.dataset(split), **kwargs)

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
    ) -> None:
        from rec_dist.data.movielens import prepare_movielens_100k

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
        )
