"""prepare_movielens_100k on tiny fake MovieLens sources (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rec_dist.data import movielens, movielens_sources
from rec_dist.data.movielens import prepare_movielens_100k
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError

MAX_HISTORY = 3
GENRES = movielens_sources.GENRES

# raw user id -> (age, gender, occupation, zip)
USERS = {10: (17, "M", "student", "85711"), 3: (24, "F", "writer", "T8H1N"), 25: (35, "M", "other", "05201"),
         7: (56, "F", "artist", "94043"), 41: (50, "M", "none", "10001")}
# raw item id -> (title, release date, genre names, year as RecBole writes it)
ITEMS = {5: ("Alpha (1995)", "01-Jan-1996", ["Comedy", "Drama"], "1995"),
         100: ("Beta (1977)", "01-Jan-1977", ["Action", "Sci-Fi"], "1977"),
         101: ("Gamma (1939)", "01-Jan-1939", ["Drama"], "1939"),
         7: ("Delta (1998)", "01-Jan-1998", ["Thriller"], "1998"),
         3: ("Epsilon (1925)", "01-Jan-1925", ["Comedy"], "1925"),
         50: ("Zeta (1995) (V)", "01-Jan-1995", ["Animation", "Children's"], "V"),
         60: ("Eta (1990)", "01-Jan-1990", [], "1990"),
         8: ("unknown", "", ["unknown"], "unkonwn")}
T0 = 880_000_000
# (user, item, rating, timestamp); user 10 rates items 100 and 101 in the same second,
# user 3 rates every item (more events than MAX_HISTORY).
EVENTS = [
    (10, 5, 4, T0 + 10), (10, 100, 2, T0 + 50), (10, 101, 5, T0 + 50), (10, 7, 3, T0 + 90),
    (3, 5, 1, T0 + 5), (3, 100, 5, T0 + 20), (3, 101, 4, T0 + 30), (3, 7, 3, T0 + 40),
    (3, 3, 2, T0 + 50), (3, 50, 5, T0 + 60), (3, 60, 4, T0 + 70), (3, 8, 3, T0 + 100),
    (25, 3, 5, T0 + 15), (25, 50, 1, T0 + 15), (25, 60, 3, T0 + 80),
    (7, 7, 4, T0 + 1), (7, 8, 2, T0 + 3600 * 30),
    (41, 100, 3, T0 + 95),
]


def write_grouplens(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in EVENTS))
    lines = []
    for i, (title, date, genres, _) in ITEMS.items():
        flags = "|".join("1" if g in genres else "0" for g in GENRES)
        lines.append(f"{i}|{title}|{date}||http://x|{flags}\n")
    (d / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (d / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, (a, g, o, z) in USERS.items()))
    return d


def recbole_files() -> list[bytes]:
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    inter += "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in EVENTS)
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    for i, (t, _, g, y) in ITEMS.items():  # RecBole strips "(year)" off titles, except when its year is bad
        title = t.split(" (")[0] if y.isdigit() else t.removesuffix(" (V)")
        item += f"{i}\t{title}\t{y}\t{' '.join(g)}\n"
    user = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    user += "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, (a, g, o, z) in USERS.items())
    return [s.encode() for s in (inter, item, user)]


def write_recbole(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, blob in zip(movielens_sources.RECBOLE_FILES, recbole_files(), strict=True):
        (d / name).write_bytes(blob)
    return d


def read(out: Path, kind: str) -> dict[str, pa.Table]:
    return {s: pq.read_table(out / kind / f"{s}.parquet") for s in ("train", "val", "test")}


def all_rows(out: Path) -> list[dict]:
    return [r for t in read(out, "ranking").values() for r in t.to_pylist()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ml")
    src = write_grouplens(root / "src")
    return prepare_movielens_100k(root / "data", source_dir=src, max_history=MAX_HISTORY)


def test_row_counts_and_split_sizes(built):
    assert built.name == "movielens-100k"
    n = len(EVENTS)
    ranking = {s: t.num_rows for s, t in read(built, "ranking").items()}
    assert ranking == {"train": int(n * 0.8), "val": int(n * 0.9) - int(n * 0.8), "test": n - int(n * 0.9)}
    retrieval = {s: t.num_rows for s, t in read(built, "retrieval").items()}
    per_user = {u: sum(e[0] == u for e in EVENTS) for u in USERS}
    assert retrieval == {"test": len(USERS), "val": sum(c >= 2 for c in per_user.values()),
                         "train": sum(max(c - 2, 0) for c in per_user.values())}
    stats = json.loads((built / "stats.json").read_text())
    assert stats["splits"]["ranking/train"]["rows"] == ranking["train"]
    schema = Schema.load(built / "schema.yaml")
    assert schema.extra["split_rows"]["retrieval"] == retrieval
    assert schema.extra["user_column"] == "user_id" and schema.extra["item_column"] == "item_id"
    assert [p.name for p in built.parent.glob(".*")] == [".movielens-100k.lock"]  # no temp dirs, only the lock file


def test_files_sorted_by_time_and_ranking_split_is_global_time_cut(built):
    parts = read(built, "ranking")
    for kind in ("ranking", "retrieval"):
        for t in read(built, kind).values():
            ts = t.column("timestamp").to_pylist()
            assert ts == sorted(ts)
    ts = {s: parts[s].column("timestamp").to_pylist() for s in parts}
    assert max(ts["train"]) <= min(ts["val"]) and max(ts["val"]) <= min(ts["test"])


def test_ids_contiguous_from_one(built):
    rows = all_rows(built)
    schema = Schema.load(built / "schema.yaml")
    user_map = {raw: k + 1 for k, raw in enumerate(sorted(USERS))}
    item_map = {raw: k + 1 for k, raw in enumerate(sorted(ITEMS))}
    assert {r["user_id"] for r in rows} == set(range(1, len(USERS) + 1))
    assert {r["item_id"] for r in rows} == set(range(1, len(ITEMS) + 1))
    assert schema.tables["user"].num_embeddings == len(USERS) + 1
    assert schema.tables["item"].num_embeddings == len(ITEMS) + 1
    got = sorted((r["user_id"], r["item_id"], r["timestamp"]) for r in rows)
    assert got == sorted((user_map[u], item_map[i], t) for u, i, _, t in EVENTS)
    for f in schema.id_features:  # every id fits its table
        size = schema.tables[f.table].num_embeddings
        for r in rows:
            values = r[f.name] if isinstance(r[f.name], list) else [r[f.name]]
            assert all(0 <= v < size for v in values), f.name
            if f.kind != "sequence":
                assert all(v >= 1 for v in values), f.name


def test_history_has_no_leakage_and_keeps_most_recent(built):
    user_map = {raw: k + 1 for k, raw in enumerate(sorted(USERS))}
    item_map = {raw: k + 1 for k, raw in enumerate(sorted(ITEMS))}
    by_key = {(user_map[u], item_map[i]): t for u, i, _, t in EVENTS}
    expected = {}
    for u, i, _, t in EVENTS:  # naive reference over the raw data
        before = sorted((t2, item_map[i2]) for u2, i2, _, t2 in EVENTS if u2 == u and t2 < t)
        expected[(user_map[u], item_map[i])] = [it for _, it in before][-MAX_HISTORY:]
    rows = all_rows(built)
    assert len(rows) == len(EVENTS)
    for r in rows:
        hist = r["hist_item_id"]
        assert hist == expected[(r["user_id"], r["item_id"])]
        assert all(by_key[(r["user_id"], h)] < r["timestamp"] for h in hist)
        assert len(r["hist_genre"]) == len(hist)
    # user 10 rated raw items 100 and 101 in the same second: neither is the other's history
    same_second = [r for r in rows if r["user_id"] == user_map[10] and r["timestamp"] == T0 + 50]
    assert len(same_second) == 2 and all(r["hist_item_id"] == [item_map[5]] for r in same_second)
    # user 3's last event: truncated to the MAX_HISTORY most recent items, oldest first
    last = next(r for r in rows if r["user_id"] == user_map[3] and r["timestamp"] == T0 + 100)
    assert last["hist_item_id"] == [item_map[3], item_map[50], item_map[60]]


def test_labels_and_features(built):
    rows = all_rows(built)
    item_map = {raw: k + 1 for k, raw in enumerate(sorted(ITEMS))}
    user_map = {raw: k + 1 for k, raw in enumerate(sorted(USERS))}
    for r in rows:
        assert r["like"] == (1.0 if r["rating"] >= 4 else 0.0)
        when = datetime.fromtimestamp(r["timestamp"], UTC)
        assert r["hour"] == when.hour + 1 and r["weekday"] == when.isoweekday()
    by_item = {r["item_id"]: r for r in rows}
    genre = {g: k + 1 for k, g in enumerate(GENRES)}
    assert by_item[item_map[5]]["genres"] == [genre["Comedy"], genre["Drama"]]
    assert by_item[item_map[5]]["primary_genre"] == genre["Comedy"]
    assert by_item[item_map[60]]["genres"] == [genre["unknown"]]  # no flags
    assert by_item[item_map[8]]["release_year"] == 0.0  # missing year
    assert by_item[item_map[8]]["release_decade"] == movielens.DECADE_MISSING
    assert by_item[item_map[101]]["release_decade"] == 2  # 1930s
    assert by_item[item_map[3]]["release_decade"] == 1  # before 1930
    assert by_item[item_map[5]]["release_decade"] == 8  # 1990s
    years = {r["item_id"]: r["release_year"] for r in rows if r["item_id"] != item_map[8]}
    assert abs(sum(years.values())) < 1e-4  # z-scored over items with a year
    by_user = {r["user_id"]: r for r in rows}
    assert by_user[user_map[10]]["age"] == 1 and by_user[user_map[3]]["age"] == 2  # 17, 24
    assert by_user[user_map[7]]["age"] == 7 and by_user[user_map[41]]["age"] == 6  # 56, 50
    assert by_user[user_map[3]]["zip_prefix"] == movielens.ZIP_NON_DIGIT
    assert by_user[user_map[25]]["zip_prefix"] == 1  # "05201"
    assert by_user[user_map[3]]["gender"] != by_user[user_map[10]]["gender"]


def test_retrieval_is_leave_last_out(built):
    parts = read(built, "retrieval")
    user_map = {raw: k + 1 for k, raw in enumerate(sorted(USERS))}
    item_map = {raw: k + 1 for k, raw in enumerate(sorted(ITEMS))}
    for u in USERS:
        ordered = sorted((t, item_map[i]) for u2, i, _, t in EVENTS if u2 == u)
        test = [r["item_id"] for r in parts["test"].to_pylist() if r["user_id"] == user_map[u]]
        val = [r["item_id"] for r in parts["val"].to_pylist() if r["user_id"] == user_map[u]]
        assert test == [ordered[-1][1]]
        assert val == ([ordered[-2][1]] if len(ordered) >= 2 else [])


def test_recbole_layout_gives_same_output(built, tmp_path):
    out = prepare_movielens_100k(tmp_path / "data", source_dir=write_recbole(tmp_path / "rb"),
                                 max_history=MAX_HISTORY)
    for kind in ("ranking", "retrieval"):
        a, b = read(built, kind), read(out, kind)
        for s in a:
            assert a[s].equals(b[s]), (kind, s)


def test_existing_output_reused_unless_force_or_other_history(built, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("should not acquire")

    monkeypatch.setattr(movielens, "acquire", boom)
    assert prepare_movielens_100k(built.parent, max_history=MAX_HISTORY) == built
    with pytest.raises(AssertionError):
        prepare_movielens_100k(built.parent, max_history=MAX_HISTORY, force=True)
    with pytest.raises(AssertionError):
        prepare_movielens_100k(built.parent, max_history=MAX_HISTORY + 1)
    assert (built / "schema.yaml").is_file()  # a failed rebuild leaves the old output alone


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = write_grouplens(tmp_path / "src")
    calls = []
    real = pq.write_table

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(movielens.pq, "write_table", flaky)
    data = tmp_path / "data"
    with pytest.raises(OSError, match="disk full"):
        prepare_movielens_100k(data, source_dir=src)
    assert len(calls) == 3
    assert [p.name for p in data.iterdir()] == [".movielens-100k.lock"]  # nothing half-written


def test_source_dir_without_either_layout(tmp_path):
    src = tmp_path / "nothing_here"
    src.mkdir()
    (src / "u.data").write_text("1\t1\t5\t0\n")  # incomplete GroupLens layout
    with pytest.raises(DataError) as err:
        prepare_movielens_100k(tmp_path / "data", source_dir=src)
    assert str(src) in str(err.value) and "u.item" in str(err.value) and "ml-100k.inter" in str(err.value)
    assert not (tmp_path / "data" / "movielens-100k").exists()


def test_remote_sources_fall_through_and_report(monkeypatch, caplog):
    def fail(msg):
        def f():
            raise OSError(msg)
        return f

    monkeypatch.setattr(movielens_sources, "REMOTE_SOURCES", (("a", fail("no dns")), ("b", fail("no pypi"))))
    with caplog.at_level(logging.WARNING, logger="rec_dist.data.movielens"), pytest.raises(DataError) as err:
        movielens_sources.acquire(None)
    assert "a: OSError: no dns" in str(err.value) and "b: OSError: no pypi" in str(err.value)
    assert len(caplog.records) == 2


def _zip_of_fake_grouplens(tmp_path: Path) -> bytes:
    src = write_grouplens(tmp_path / "zsrc")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in movielens_sources.GROUPLENS_FILES:
            z.write(src / f, f"ml-100k/{f}")
    return buf.getvalue()


def test_zip_checksum_mismatch(tmp_path, monkeypatch):
    blob = _zip_of_fake_grouplens(tmp_path)
    monkeypatch.setattr(movielens_sources.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    with pytest.raises(DataError) as err:
        movielens_sources.from_grouplens_zip()
    md5 = hashlib.md5(blob).hexdigest()
    message = str(err.value)
    assert "ml-100k.zip" in message and md5 in message and movielens_sources.ML100K_MD5 in message
    monkeypatch.setattr(movielens_sources, "ML100K_MD5", md5)
    raw = movielens_sources.from_grouplens_zip()
    assert len(raw.user) == len(EVENTS) and raw.checksums["ml-100k.zip:md5"] == md5


def test_wheel_source_checks_sha256(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for suffix, blob in zip(("inter", "item", "user"), recbole_files(), strict=True):
            z.writestr(movielens_sources.RECBOLE_WHEEL[2] + suffix, blob)
    wheel = buf.getvalue()

    def fake_pip(cmd, **_kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "recbole==1.2.1" in cmd
        Path(cmd[cmd.index("--dest") + 1], "recbole-1.2.1-py3-none-any.whl").write_bytes(wheel)
        return movielens_sources.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(movielens_sources.subprocess, "run", fake_pip)
    with pytest.raises(DataError) as err:
        movielens_sources.from_recbole_wheel()
    got = hashlib.sha256(wheel).hexdigest()
    assert "recbole-1.2.1-py3-none-any.whl" in str(err.value) and got in str(err.value)
    assert movielens_sources.RECBOLE_WHEEL[1] in str(err.value)
    pinned = ("recbole==1.2.1", got, movielens_sources.RECBOLE_WHEEL[2])
    monkeypatch.setattr(movielens_sources, "RECBOLE_WHEEL", pinned)
    raw = movielens_sources.from_recbole_wheel()
    assert raw.source == "pypi:recbole==1.2.1" and len(raw.user) == len(EVENTS)
