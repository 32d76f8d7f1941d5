"""The three model protocols: what a task may call on a model, and nothing more.

One interface per task kind means one evaluator, one tuner, one exporter for
every model of that kind (RecBole's lesson). A model is a pure ``nn.Module``
built as ``Model(schema, ...)``; it never knows whether its tables are
sharded, and it declares the schema features it reads as ``input_features``
(the data module loads only those columns). Shapes: B rows in a batch, N
items, d the vector width, K interests, E events in a batch's sequences.

**Ranking** (``RankingTask``, ``MultiTaskTask``)::

    model = Model(schema, tasks, **init_args)
    model(batch) -> {task: logits (B,)}            # one logit (or regression output) per task

A ranker with a training-only objective of its own (DIEN's auxiliary
next-behaviour loss) adds it in training mode as one more entry,
``{AUXILIARY_LOSS: scalar}``, already weighted; the task adds it to its
loss and logs it as ``train/auxiliary_loss``. Out of training the key is
absent, so scoring code never sees it.

**Retrieval** (``RetrievalTask``)::

    model = Model(schema, **init_args)
    model.encode_query(batch)      -> (B, d)  or (B, K, d) for multi-interest models
    model.encode_item(item_batch)  -> (N, d)

``item_batch`` is a ``Batch`` of item features (a training batch's own
items, or the item table's rows for the corpus pass): training, the corpus
pass, the evaluator and an exported index all use the same two functions.
A multi-interest query scores an item by its best interest. Training calls
the model itself, ``model(batch) -> (encode_query(batch), encode_item(batch))``,
so that DistributedDataParallel (inside DistributedModelParallel) sees the
step and syncs gradients; evaluation calls ``encode_*`` on the unwrapped
module.

**Next item** (``NextItemTask``)::

    model = Model(schema, **init_args)
    model.encode_sequence(batch)   -> JaggedSequence: values (E, d), offsets (B+1,)
    model.encode_item(item_batch)  -> (N, d)
    model.sequence_feature         -> the sequence feature whose ids are the events' items

``encode_sequence`` gives one hidden state per event of the jagged
sequence, each summarising that event and the ones before it (causal), so
the state at event t is scored against item vectors to predict event t+1;
the state at the last event is the query for the row's target item.
Training calls ``model(batch, item_batch) -> (encode_sequence(batch),
encode_item(item_batch))`` (DDP, as above).

**Masked item** (``MaskedItemTask``; BERT4Rec's cloze training)::

    model = Model(schema, **init_args)
    model.encode_tokens(batch, masked) -> JaggedSequence: values (E + B, d), one state per token
    model.encode_query(batch)      -> (B, d)
    model.encode_item(item_batch)  -> (N, d)
    model.sequence_feature

The tokens of a row are its events followed by the row's own item
(``append_per_row`` in ``rec_dist.models.sequential``); ``masked`` ``(E + B,)``
says which tokens the model replaces by its [mask] embedding, and the
state of a masked token is scored against item vectors to recover that
token's item. The task draws the mask (its probability is a training knob);
the model only applies it, so a given mask gives a deterministic state.
``encode_query`` is the state of a [mask] token appended after the row's
last event (the row's item is never read). Training calls
``model(batch, item_batch, masked)``.

``query_vectors(model, batch)`` is what a retrieval or next-item model
answers for a row outside training (the evaluator, the MLflow pyfunc).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from rec_dist.data.batch import Batch
from rec_dist.errors import ConfigError

KINDS = ("ranking", "retrieval", "next_item", "masked_item")
AUXILIARY_LOSS = "auxiliary_loss"  # a ranker's extra training loss, beside its task logits (module docstring)


@runtime_checkable
class RankingModelProtocol(Protocol):
    tasks: tuple[str, ...]

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class RetrievalModelProtocol(Protocol):
    def encode_query(self, batch: Batch) -> torch.Tensor: ...

    def encode_item(self, item_batch: Batch) -> torch.Tensor: ...


@runtime_checkable
class NextItemModelProtocol(Protocol):
    sequence_feature: str

    def encode_sequence(self, batch: Batch): ...

    def encode_item(self, item_batch: Batch) -> torch.Tensor: ...


@runtime_checkable
class MaskedItemModelProtocol(Protocol):
    sequence_feature: str

    def encode_tokens(self, batch: Batch, masked: torch.Tensor): ...

    def encode_query(self, batch: Batch) -> torch.Tensor: ...

    def encode_item(self, item_batch: Batch) -> torch.Tensor: ...


_PROTOCOLS = {
    "ranking": (RankingModelProtocol, "forward(batch) -> {task: logits} and a `tasks` attribute"),
    "retrieval": (RetrievalModelProtocol, "encode_query(batch) and encode_item(item_batch)"),
    "next_item": (NextItemModelProtocol, "encode_sequence(batch), encode_item(item_batch), `sequence_feature`"),
    "masked_item": (MaskedItemModelProtocol,
                    "encode_tokens(batch, masked), encode_query(batch), encode_item(item_batch), `sequence_feature`"),
}


def query_vectors(model: object, batch: Batch) -> torch.Tensor:
    """``(B, d)`` (or ``(B, K, d)``) query vectors: ``encode_query``, or the state at each row's last event."""
    if isinstance(model, RetrievalModelProtocol):
        return model.encode_query(batch)
    if isinstance(model, NextItemModelProtocol):
        states = model.encode_sequence(batch)  # JaggedSequence: values (E, d), offsets (B+1,)
        offsets = states.offsets
        has_events = offsets[1:] > offsets[:-1]  # (B,)
        out = states.values.new_zeros(offsets.numel() - 1, states.values.shape[1])  # (B, d); empty rows: 0
        out[has_events] = states.values[offsets[1:][has_events] - 1]
        return out
    raise TypeError(f"{type(model).__name__} has no query vectors (neither a retrieval nor a next-item model)")


def check_protocol(model: object, kind: str, where: str = "model.init_args.model") -> None:
    """Raise a clear error when ``model`` does not offer what a task of ``kind`` calls."""
    if kind not in _PROTOCOLS:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    protocol, needs = _PROTOCOLS[kind]
    if not isinstance(model, protocol):
        raise TypeError(
            f"{where}: {type(model).__name__} is not a {kind} model; a {kind} task needs {needs} "
            f"(see rec_dist.models.protocols)"
        )
