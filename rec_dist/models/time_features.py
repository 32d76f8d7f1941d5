"""Per-event times of a behaviour sequence and the row's request time, read as raw ids.

A schema carries time as id features: a sequence side feature of the
history group (one time per event, e.g. ``hist_hour``: hours since the data
set's start) and a sparse feature of the row (``request_hour``: when the
row was scored), in one unit. Models never embed them; they read the raw
values (``Batch.ids``) and derive the event's age ``request - t_event``
(time decay, BST's time gap) or gaps between events (HSTU's relative time
bias). Bucketising a gap by ``log2`` (``rec_dist.layers.time_buckets``) lets a model embed
it, as BST's paper and HSTU do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.layers.time_buckets import log2_buckets

__all__ = ["TimeFeatures", "log2_buckets"]


@dataclass(frozen=True)
class TimeFeatures:
    """The per-event time feature (aligned with ``sequence``) and, optionally, the row's request time."""

    event: str
    request: str | None

    @classmethod
    def from_schema(
        cls, schema: Schema, event: str | None, request: str | None, sequence: str, model: str,
        event_knob: str = "time_feature", request_knob: str = "request_time_feature", need_request: bool = True,
    ) -> TimeFeatures | None:
        """Checked time features, or None when ``event`` is None; errors name ``model`` and the knob."""
        if event is None:
            if request is not None:
                raise ConfigError(f"{model}: {request_knob} {request!r} needs {event_knob} (the per-event times)")
            return None
        if event not in schema.features or schema.features[event].kind != "sequence":
            raise ConfigError(f"{model}: {event_knob} {event!r} must name a sequence feature of schema "
                              f"{schema.name!r} (one time per event); sequences: "
                              f"{[f.name for f in schema.of_kind('sequence')]}")
        if schema.features[event].max_len != schema.features[sequence].max_len:
            raise ConfigError(
                f"{model}: {event_knob} {event!r} (max_len {schema.features[event].max_len}) must be aligned with "
                f"the history {sequence!r} (max_len {schema.features[sequence].max_len}): one time per event"
            )
        if request is None and need_request:
            raise ConfigError(f"{model}: {event_knob} {event!r} needs {request_knob} (a sparse feature: the row's "
                              f"request time, in the same unit) to measure the events' ages")
        if request is not None and (request not in schema.features or schema.features[request].kind != "sparse"):
            raise ConfigError(f"{model}: {request_knob} {request!r} must name a sparse feature of schema "
                              f"{schema.name!r} (the row's request time)")
        return cls(event, request)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.event,) if self.request is None else (self.event, self.request)

    def event_times(self, batch: Batch, num_events: int) -> torch.Tensor:
        """``(N,)`` raw time of every event, in the history's jagged order."""
        times = batch.ids(self.event)
        if times.shape[0] != num_events:
            raise ValueError(f"{self.event!r}: {times.shape[0]} event times for {num_events} history events; the "
                             f"time feature must hold one value per event of the history")
        return times

    def ages(self, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """``(N,)`` ``request - t_event`` of every event (``rows``: each event's row), at least 0."""
        assert self.request is not None
        request = batch.ids(self.request)  # (B,)
        return (request.index_select(0, rows) - self.event_times(batch, rows.shape[0])).clamp(min=0)  # (N,)
