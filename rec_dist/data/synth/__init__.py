"""Deterministic synthetic recommender logs with a planted, documented signal.

``synthesize(out_dir, SynthConfig(...))`` streams ``train/val/test.parquet``
(80/10/10 of the rows, in row order), ``schema.yaml`` and ``truth.json`` into
``out_dir``, atomically. It never holds the whole log in memory and stores
nothing per user or per item, so ``num_users`` / ``num_items`` may be tens of
millions.

Randomness is counter based: every random number is a SplitMix64 hash of
``(seed, stream, key)`` where the key is the global row index (or the row's
hash plus the position in its history, or a user / item id). A row is
therefore a pure function of ``(config, row index)``, and the output does not
depend on ``chunk_rows`` (only the parquet row-group boundaries do).

Planted rules (coefficients in ``COEFFICIENTS`` and in ``truth.json``):

* Popularity. Users (activity) and items (popularity) are drawn by rank from
  Zipf(``zipf_a``) with a continuous inverse CDF, then mapped to ids by a seeded
  affine permutation of ``1..N`` (so id 1 is not the most popular one).
  ``item_popularity = 1 - log(rank) / log(num_items + 1)`` lies in (0, 1].
* Categories. Item ranks come in blocks of ``num_categories``; each block holds
  one item of every category in a seeded rotated order, so "a popular item of
  category c" is sampled by drawing a block from Zipf.
* Users. From a hash of (seed, user id): ``preferred`` category, group
  ``new`` with probability ``cold_start_fraction`` (``user_group`` 2, else 1),
  an ``old interest`` (a category != preferred) for a fraction
  ``old_interest_fraction`` of the regular users, and ``user_age_norm`` ~ N(0, 1).
  ``user_activity = 1 + floor(log2(activity rank))`` (1 = most active).
* Impressions. ``item_id`` is an item of the preferred category with
  probability ``p_preferred``, of the old-interest category with probability
  ``p_old_interest`` (old-interest users only), else a Zipf-popular item.
* Histories (oldest first). Regular users: length uniform in
  ``[ceil(seq_len/2), seq_len]``; each event is of the preferred category with
  probability 0.5, else popular. For old-interest users the oldest
  ``ceil(0.1 * length)`` events are of the old-interest category with
  probability 0.8 (that category appears nowhere else beyond chance) - only a
  model that reads the whole sequence can see it. New users: length uniform in
  ``[0, max(1, seq_len // 10)]``, popular items only.
* Per-user histories (``user_history_len > 0``; ``user_histories`` module).
  Each user has one event log, oldest first, and a row's history is the
  user's events before the row's ``history_end``. ``history_layout:
  stored_once`` writes each log once (``histories.parquet``, the schema's
  ``histories`` block) and rows that carry ``history_end`` instead of lists;
  ``row_copy`` copies the last ``seq_len`` events into each row. Both layouts
  give the same batches. ``long_range_config(L)`` is the long-sequence data
  (issue 12): every regular log ``L/2 .. L`` events, rows that see at least 3/4
  of it, so the old interest lies thousands of events back at L = 10,000.
* Click. ``P(click) = sigmoid(logit)`` with, for regular users,
  ``-2.5 + 2.5*[category == preferred] + 2.0*[category == old interest]
  - 0.4*item_price + 0.3*user_age_norm`` and, for new users (who ignore
  categories), ``-4.0 + 4.0*item_popularity - 0.4*item_price``.
  ``click_probability(columns, truth)`` recomputes it from the columns.
* ``like`` only if clicked: ``P = sigmoid(-1 + 1.5*[regular and preferred]
  - 0.5*[new])``. ``purchase`` only if clicked: ``P = sigmoid(-2 + 1.0*like
  - 0.5*item_price)``. ``watch_time`` (seconds): if clicked
  ``exp(log 30 + 0.5*[preferred] + 0.5*like + 0.5*N(0,1))``, else 3 s-mean
  exponential bounce with probability 0.3, else 0.
"""

from rec_dist.data.synth.config import COEFFICIENTS, LONG_RANGE_LENGTHS, SynthConfig, long_range_config
from rec_dist.data.synth.config import NEW as NEW
from rec_dist.data.synth.config import REGULAR as REGULAR
from rec_dist.data.synth.random import _zipf_rank as _zipf_rank
from rec_dist.data.synth.rows import ARROW_SCHEMA as ARROW_SCHEMA
from rec_dist.data.synth.rows import generate_rows
from rec_dist.data.synth.rules import TruthLike as TruthLike
from rec_dist.data.synth.rules import click_probability, item_category, item_popularity, load_truth, user_profile
from rec_dist.data.synth.writer import MAX_CHUNK_POSITIONS as MAX_CHUNK_POSITIONS
from rec_dist.data.synth.writer import RULES as RULES
from rec_dist.data.synth.writer import SPLITS as SPLITS
from rec_dist.data.synth.writer import build_schema as build_schema
from rec_dist.data.synth.writer import split_bounds as split_bounds
from rec_dist.data.synth.writer import synthesize

# Modules: config (SynthConfig, COEFFICIENTS), random (counter-based RNG, Zipf, permutation),
# rules (planted model, user profiles, click_probability, truth loading), rows (generate_rows),
# writer (chunked parquet writing, schema, truth.json, synthesize).
# The ``X as X`` imports above are re-exports outside __all__ (as in the former single module).
__all__ = [
    "COEFFICIENTS",
    "SynthConfig",
    "LONG_RANGE_LENGTHS",
    "long_range_config",
    "synthesize",
    "generate_rows",
    "click_probability",
    "user_profile",
    "item_popularity",
    "item_category",
    "load_truth",
]
