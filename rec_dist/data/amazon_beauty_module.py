"""``AmazonBeauty``: the Amazon Beauty leave-one-out split as a data module, prepared on first use.

Kept apart from ``amazon_beauty.py`` so that ``rec-dist data prepare`` does not import Lightning.
"""

from __future__ import annotations

from rec_dist.data.amazon_beauty import DEFAULT_SOURCE_DIR, ITEMS_FILE, prepare_amazon_beauty
from rec_dist.data.datamodule import ParquetDataModule


class AmazonBeauty(ParquetDataModule):
    """Amazon Beauty (``rec-dist data prepare amazon-beauty``): per-user leave-one-out rows with the user's
    earlier items (``hist_item_id``), the item table as the retrieval corpus.

    ``source_dir`` holds ``beauty.txt`` (sha256-checked), relative to the working directory;
    ``max_history`` is the longest history kept per row (a different value rebuilds the prepared data).
    """

    def __init__(
        self,
        data_dir: str = "data",
        source_dir: str = DEFAULT_SOURCE_DIR,
        max_history: int = 50,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer_rows: int = 1 << 20,
        seed: int = 0,
        features: list[str] | None = None,
        embedding_dim: int | dict[str, int] | None = None,
    ) -> None:
        root = prepare_amazon_beauty(data_dir, source_dir, max_history=max_history)
        super().__init__(
            schema_path=str(root / "schema.yaml"),
            train="retrieval/train.parquet",
            val="retrieval/val.parquet",
            test="retrieval/test.parquet",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            shuffle_buffer_rows=shuffle_buffer_rows,
            seed=seed,
            features=features,
            embedding_dim=embedding_dim,
            items=ITEMS_FILE,
        )
