"""Retrieval task: in-batch sampled softmax training, full-corpus Recall/NDCG@K evaluation.

Training: each row is (query features, positive item); the model's
``forward(batch)`` gives ``(encode_query(batch), encode_item(batch))`` from one
lookup pass (through DistributedDataParallel when sharded), and the loss is
the sampled softmax of each query's positive among the candidates, with
accidental hits masked by item id (``rec_dist.losses.retrieval.RetrievalLoss``).
Candidates: every rank's in-batch positives (``gather_negatives``), optionally
``mixed_negatives`` uniform items of the item table and a ``memory_size``
cross-batch memory; ``logq_correction`` subtracts the log expected count of
each candidate's item, from a streaming frequency estimate (Yi et al. 2019).

Evaluation (val / test): at the start of the stage every item of the item
table (``datamodule.item_table()``) is encoded once, in chunks of
``corpus_batch_size``; each row's query is then scored against the whole
corpus and the rank of the row's item is accumulated
(``rec_dist.metrics.retrieval``: pessimistic ties, HitRate / Recall / NDCG /
MRR @K for every K of ``ks``, and MRR). With ``exclude_seen`` (the default)
the items the user interacted with in the earlier splits are removed from the
ranking (validation: train; test and predict: train + val). The protocol is
printed at the start of each stage and logged as run parameters
(``eval/candidates: full_corpus``, ``eval/exclude_seen``, ``eval/ties``).
``sampled_negatives: M`` adds the sampled protocol (the target among M
uniform negatives), always logged under ``<stage>/sampled_<M>/...``.
``popularity_baseline`` scores the same rows with a most-popular ranking
(items by their number of training rows, same exclusions, same evaluator),
logged as ``<stage>/popularity/...`` beside the model's metrics. Predict:
the ``top_k`` items per query, one output row per (query, rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.interactions import SeenItems, item_counts
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.losses.frequency import StreamingFrequency
from rec_dist.losses.retrieval import RetrievalLoss
from rec_dist.metrics.retrieval import (
    RetrievalMetrics,
    sample_negatives,
    sampled_target_ranks,
    target_ranks,
    top_items,
)
from rec_dist.models.protocols import check_protocol
from rec_dist.tasks.base import STAGES, ModelFactory, RecTask

# Splits whose interactions are "seen" before each stage's rows (leave-last-out: train < val < test).
SEEN_SPLITS = {"val": ("train",), "test": ("train", "val"), "predict": ("train", "val")}


class RetrievalTask(RecTask):
    """Trains a retrieval model (``rec_dist.models.protocols``) with in-batch negatives; see the module docstring.

    Args:
        model: the model factory, built as ``model(schema)``.
        schema: linked from the data module by the CLI.
        temperature: softmax temperature tau (logits ``q·v / tau``; small for L2-normalised vectors).
        ks: cut-offs of HitRate / Recall / NDCG / MRR @K; the first is the checkpoint monitor ``val/recall_at_K``.
        exclude_seen: drop the user's earlier items from the ranking.
        popularity_baseline: also evaluate the most-popular ranking (``<stage>/popularity/...``).
        top_k: items per query written by ``predict``.
        corpus_batch_size: items per batch of the corpus pass.
        score_chunk_size: items scored at once per query batch (memory: eval batch x this).
        sampled_negatives: also rank each target among this many uniformly sampled negatives (0: off), logged
            as ``<stage>/sampled_<M>/...``: the "100 negatives" protocol, not comparable with full-corpus numbers.
        logq_correction: subtract each candidate's log expected count (``log(n p_i + M / V)``,
            ``rec_dist.losses.retrieval``), so popular items are not pushed down for being frequent negatives.
        frequency_alpha: rate of the streaming gap estimate behind ``p_i`` (~1 / occurrences it averages).
        frequency_buckets: hashed counters per hash function; None: one exact counter per item id.
        frequency_hashes: hash functions when ``frequency_buckets`` is set (the largest gap wins).
        mixed_negatives: M items drawn uniformly from the item table per step, encoded by the item tower.
        memory_size: item vectors of recent batches kept as extra (detached, stale) negatives; 0: none.
        gather_negatives: with several workers, every worker's in-batch items are every query's candidates
            (all-gather with gradients: N workers train like one on the global batch).
        kwargs: ``optimizer``, ``lr_scheduler``, ``sparse_optimizer``, ``meta_embeddings`` of ``RecTask``.
    """

    protocol = "retrieval"  # the model protocol this task checks (rec_dist.models.protocols)

    def __init__(
        self,
        model: ModelFactory,
        schema: Schema | None = None,
        temperature: float = 0.05,
        ks: Sequence[int] = (10, 50),
        exclude_seen: bool = True,
        popularity_baseline: bool = True,
        top_k: int = 100,
        corpus_batch_size: int = 8192,
        score_chunk_size: int = 16_384,
        sampled_negatives: int = 0,
        logq_correction: bool = False,
        frequency_alpha: float = 0.01,
        frequency_buckets: int | None = None,
        frequency_hashes: int = 2,
        mixed_negatives: int = 0,
        memory_size: int = 0,
        gather_negatives: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(schema, **kwargs)  # optimizer, lr_scheduler, sparse_optimizer, meta_embeddings: RecTask
        schema = self.schema
        if temperature <= 0:
            raise ConfigError(f"model.init_args.temperature must be positive, got {temperature}")
        for knob, value in (("top_k", top_k), ("corpus_batch_size", corpus_batch_size),
                            ("score_chunk_size", score_chunk_size)):
            if value <= 0:
                raise ConfigError(f"model.init_args.{knob} must be positive, got {value}")
        if sampled_negatives < 0:
            raise ConfigError(f"model.init_args.sampled_negatives must be >= 0 (0: off), got {sampled_negatives}")
        self.sampled_negatives = sampled_negatives
        self.user_column = _id_column(schema, "user_column")
        self.item_column = _id_column(schema, "item_column")
        self.temperature = temperature
        self.exclude_seen = exclude_seen
        self.popularity_baseline = popularity_baseline
        self.top_k, self.corpus_batch_size, self.score_chunk_size = top_k, corpus_batch_size, score_chunk_size
        self.model = self.build_model(model)
        check_protocol(self.model, self.protocol)
        self.mixed_negatives = mixed_negatives
        self.retrieval_loss = self._training_loss(logq_correction, frequency_alpha, frequency_buckets,
                                                  frequency_hashes, mixed_negatives, memory_size, gather_negatives)
        self.metrics = nn.ModuleDict({stage: RetrievalMetrics(ks) for stage in STAGES})
        self.baseline = nn.ModuleDict({stage: RetrievalMetrics(ks) for stage in STAGES})
        self.sampled = nn.ModuleDict({stage: RetrievalMetrics(ks) for stage in STAGES} if sampled_negatives else {})
        self._sampler: torch.Generator | None = None  # negatives of the sampled metrics, seeded per stage
        self.monitor = (f"val/recall_at_{self.metrics['val'].ks[0]}", "max")
        self._corpus: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids (N,), vectors (N, d))
        self._popularity: torch.Tensor | None = None  # (N, 1) training-row count per corpus item
        self._seen: dict[str, SeenItems] = {}
        self._logged_params: set[str] = set()  # stages whose evaluation protocol was logged

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        """What evaluation and predict score the corpus with: ``encode_query(batch)`` (a kind built on this
        task, such as next-item, gives its own)."""
        return self.retrieval_model().encode_query(batch)  # (B, d) or (B, K, d)

    def extra_columns(self) -> list[str]:
        return [self.user_column, self.item_column]

    def retrieval_model(self) -> nn.Module:
        """The model itself (unwrapped from DistributedModelParallel under the torchrec strategy)."""
        return getattr(self.model, "module", self.model)

    # ---- training --------------------------------------------------------------------------------
    def _training_loss(self, logq_correction: bool, frequency_alpha: float, frequency_buckets: int | None,
                       frequency_hashes: int, mixed_negatives: int, memory_size: int,
                       gather_negatives: bool) -> RetrievalLoss:
        """The loss of ``training_step`` from the negative-sampling knobs, each checked with a named error."""
        knobs = {"logq_correction": (logq_correction, False), "mixed_negatives": (mixed_negatives, 0),
                 "memory_size": (memory_size, 0), "gather_negatives": (gather_negatives, True)}
        changed = [k for k, (value, default) in knobs.items() if value != default]
        if changed and type(self).training_step is not RetrievalTask.training_step:
            raise ConfigError(f"{type(self).__name__} trains with its own loss: model.init_args.{changed[0]} is a "
                              f"RetrievalTask knob it does not use; remove it")
        for knob, value in (("mixed_negatives", mixed_negatives), ("memory_size", memory_size)):
            if value < 0:
                raise ConfigError(f"model.init_args.{knob} must be >= 0 (0: off), got {value}")
        if not 0 < frequency_alpha <= 1:
            raise ConfigError(f"model.init_args.frequency_alpha must lie in (0, 1], got {frequency_alpha}")
        if frequency_hashes <= 0 or (frequency_buckets is not None and frequency_buckets <= 0):
            raise ConfigError(f"model.init_args.frequency_hashes and frequency_buckets must be positive, got "
                              f"{frequency_hashes} and {frequency_buckets}")
        frequency = None
        if logq_correction:
            if frequency_buckets is None:  # exact: one counter per id of the item table's vocabulary
                vocabulary = self.schema.table_of(self.item_column).num_embeddings
                frequency = StreamingFrequency(vocabulary, frequency_alpha, hashed=False)
            else:
                frequency = StreamingFrequency(frequency_buckets, frequency_alpha, frequency_hashes)
        return RetrievalLoss(self.temperature, frequency, memory_size, gather_negatives)

    def _uniform_negatives(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``mixed_negatives`` items drawn uniformly (with replacement) from the item table, through the item
        tower: ``(vectors (M, d), ids (M,), table size)``."""
        table = self._datamodule().item_table()
        ids = table.ids[torch.randint(table.num_items, (self.mixed_negatives,)).numpy()]  # (M,)
        vectors = self.retrieval_model().encode_item(table.batch(ids).to(self.device))  # (M, d)
        return vectors, torch.from_numpy(ids).to(self.device), table.num_items

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        query, item = self.model(batch)  # (B, d), (B, d)
        mixed, corpus_size = None, None
        if self.mixed_negatives:
            vectors, ids, corpus_size = self._uniform_negatives()
            mixed = (vectors, ids)
        loss = self.retrieval_loss(query, item, batch.ids(self.item_column), mixed, corpus_size)
        loss = self.add_auxiliary_losses(loss, batch.batch_size)  # a model's regulariser (RecTask)
        self.log_train_loss(loss, batch.batch_size)
        return loss

    # ---- the corpus ------------------------------------------------------------------------------
    def _datamodule(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "item_table"):
            raise ConfigError(
                f"{type(self).__name__}: evaluation needs a data module with an item table "
                f"(rec_dist.data.datamodule.ParquetDataModule with data.init_args.items)"
            )
        return datamodule

    @torch.no_grad()
    def encode_corpus(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item of the item table through the item tower: ``(ids (N,), vectors (N, d))``."""
        table = self._datamodule().item_table()
        model = self.retrieval_model()
        vectors = []
        for start in range(0, table.num_items, self.corpus_batch_size):
            chunk = table.ids[start : start + self.corpus_batch_size]
            vectors.append(model.encode_item(table.batch(chunk).to(self.device)))  # (C, d)
        return torch.from_numpy(table.ids).to(self.device), torch.cat(vectors)  # (N,), (N, d)

    def evaluation_params(self) -> dict[str, object]:
        """How the metrics were computed, logged as run parameters (``eval/...``) so a number is never read
        without its protocol: full corpus or sampled, seen items excluded or not, the tie rule."""
        return {"eval/candidates": "full_corpus", "eval/exclude_seen": self.exclude_seen,
                "eval/ties": "pessimistic", "eval/ks": list(self.metrics["val"].ks),
                "eval/sampled_negatives": self.sampled_negatives}

    def _log_evaluation_params(self, stage: str, num_items: int) -> None:
        seen = f"the user's {' + '.join(SEEN_SPLITS[stage])} items excluded" if self.exclude_seen else "seen items kept"
        if self._trainer is None or self.trainer.is_global_zero:
            print(f"{stage}: ranking the full corpus of {num_items} items, {seen}, ties pessimistic"
                  + (f"; {stage}/sampled_{self.sampled_negatives}/...: among {self.sampled_negatives} sampled "
                     f"negatives (not comparable)" if self.sampled_negatives else ""))
        for logger in self.loggers if self._trainer is not None else ():
            logger.log_hyperparams(self.evaluation_params())

    def _start_stage(self, stage: str) -> None:
        self.check_fused_inference()
        self._corpus = self.encode_corpus()
        rank = self.trainer.global_rank if self._trainer is not None else 0
        seed = 7919 * {"val": 0, "test": 1}.get(stage, 2) + rank  # fixed draws per (stage, rank): repeatable
        self._sampler = torch.Generator(device=self._corpus[0].device).manual_seed(seed)
        if stage not in self._logged_params:
            self._logged_params.add(stage)
            self._log_evaluation_params(stage, self._corpus[0].numel())
        if self.exclude_seen and stage not in self._seen:
            self._seen[stage] = SeenItems.from_parquet(self._files(SEEN_SPLITS[stage]), self.user_column,
                                                       self.item_column)
        if self.popularity_baseline and self._popularity is None:
            ids = self._corpus[0].cpu().numpy()
            counts = item_counts(self._files(("train",)), self.item_column, ids)
            self._popularity = torch.from_numpy(counts).to(self.device, torch.float32).unsqueeze(1)  # (N, 1)

    def _files(self, splits: Sequence[str]) -> list[str]:
        datamodule = self._datamodule()
        return [f for split in splits if datamodule.splits.get(split) is not None
                for f in datamodule.split_files(split)]

    def _exclude(self, stage: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.exclude_seen:
            return None
        return self._seen[stage].of(batch.ids(self.user_column))

    # ---- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch: Batch, stage: str) -> None:
        assert self._corpus is not None, "the corpus is encoded at the start of each evaluation stage"
        ids, vectors = self._corpus
        query = self.query_vectors(batch)  # (B, d) or (B, K, d)
        targets = batch.ids(self.item_column)  # (B,)
        exclude = self._exclude(stage, batch)
        self.metrics[stage].update(target_ranks(query, vectors, ids, targets, exclude, self.score_chunk_size))
        if self.popularity_baseline and self._popularity is not None:
            ones = self._popularity.new_ones(targets.shape[0], 1)  # (B, 1): every query scores an item by its count
            ranks = target_ranks(ones, self._popularity, ids, targets, exclude, self.score_chunk_size)
            self.baseline[stage].update(ranks)
        if self.sampled_negatives:
            negatives = sample_negatives(ids, targets, self.sampled_negatives, exclude, self._sampler)  # (B, M)
            self.sampled[stage].update(sampled_target_ranks(query, vectors, ids, targets, negatives))

    def _end_stage(self, stage: str) -> None:
        # torchmetrics already reduced these over ranks; sync_dist only averages equal values.
        values = {f"{stage}/{k}": v for k, v in self.metrics[stage].compute().items()}
        self.log_dict(values, prog_bar=stage == "val", sync_dist=self.synced)
        if self.popularity_baseline:
            baseline = {f"{stage}/popularity/{k}": v for k, v in self.baseline[stage].compute().items()}
            self.log_dict(baseline, sync_dist=self.synced)
        if self.sampled_negatives:
            sampled = {f"{stage}/sampled_{self.sampled_negatives}/{k}": v
                       for k, v in self.sampled[stage].compute().items()}
            self.log_dict(sampled, sync_dist=self.synced)
            self.sampled[stage].reset()
        self.metrics[stage].reset()
        self.baseline[stage].reset()
        self._corpus = None

    def on_validation_epoch_start(self) -> None:
        self._start_stage("val")

    def on_test_epoch_start(self) -> None:
        self._start_stage("test")

    def on_predict_epoch_start(self) -> None:
        self._start_stage("predict")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._end_stage("val")

    def on_test_epoch_end(self) -> None:
        self._end_stage("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """The ``top_k`` items of each row's query, long format: one output row per (query, rank)."""
        assert self._corpus is not None
        ids, vectors = self._corpus
        query = self.query_vectors(batch)  # (B, d)
        best, scores = top_items(query, vectors, ids, self.top_k, self._exclude("predict", batch),
                                 self.score_chunk_size)  # (B, k), (B, k)
        k = best.shape[1]
        users = batch.ids(self.user_column)  # (B,)
        return {
            self.user_column: users.repeat_interleave(k),  # (B*k,)
            "rank": torch.arange(1, k + 1, device=best.device).repeat(users.shape[0]),  # (B*k,)
            self.item_column: best.flatten(),  # (B*k,)
            "score": scores.flatten(),  # (B*k,)
        }


def _id_column(schema: Schema, key: str) -> str:
    """The sparse feature ``schema.extra[key]`` names (the user / item id column)."""
    name = schema.extra.get(key)
    if name not in schema.features or schema.features[name].kind != "sparse":
        raise ConfigError(
            f"RetrievalTask: schema {schema.name!r} must name its {key.split('_')[0]} id column in "
            f"`{key}` (a sparse feature); got {name!r}"
        )
    return str(name)
