"""Peer half of the DeepFM benchmark: train torch-rechub's or DeepCTR-Torch's DeepFM on the
parquet ranking split, the way each library's README / tutorial does it, and write one JSON.

Runs in the peers' own venv (see benchmarks/setup_peers.sh), never in the project's:

    .bench-venv/bin/python benchmarks/peers.py --library {rechub,deepctr} --data DIR \\
        --batch-size N --epochs E --out result.json

    # a fake split with the real columns, for smoke tests:
    .bench-venv/bin/python benchmarks/peers.py --make-fake DIR [--fake-train-rows 50000]

Data: DIR/{train,val,test}.parquet. Sparse features: ``--sparse-features`` (single-valued int64
ids starting at 1; vocab size = max+1 over all three splits); dense feature(s): ``--dense-features``
(default release_year, float32, used as is: the prepare step already z-scores it); label ``like``
(float 0/1). Other columns in the files are ignored.

Model (both peers): embedding dim 16 for every sparse feature, shared by the FM and the deep part;
MLP 256-128 relu, no dropout; Adam lr 1e-3 (no weight decay / L2 unless --library-default-reg);
BCE loss; seed 0; torch.set_num_threads(--threads, default 2); DataLoader num_workers 0 (both
libraries' default). Library-specific structure that cannot be switched off is recorded in the
JSON under "model" (see PEER NOTES below).

Timing (``train_seconds``): wall time (time.perf_counter) from the moment the library's training
loop starts its first epoch (i.e. just before the first batch is fetched from its DataLoader) to
the moment its last epoch's loop ends. Everything inside is included: DataLoader iteration and
collation (the libraries' own data path), forward/backward/step, loss.item() syncs, and per-epoch
bookkeeping between epochs. Excluded: parquet reading, vocab computation, building the model /
optimizer / feature columns, building the library's Dataset (rechub: DataGenerator/TorchDataset
over numpy arrays; deepctr: the np.concatenate + TensorDataset that ``fit`` does before its epoch
loop), the end-of-fit checkpoint rechub's CTRTrainer always writes, and test evaluation.
No validation runs during training: rechub's ``fit`` gets no val_dataloader, deepctr's ``fit`` gets
no validation_split / validation_data, and verbose=0 (no per-batch train metrics).
``fit_seconds`` is the wall time of the whole library call (rechub ``CTRTrainer.fit``, deepctr
``model.fit``), i.e. train_seconds plus the pre-loop prep and post-loop work listed above.
``samples_per_second`` = train_rows * epochs / train_seconds.
``test_auc`` / ``test_logloss`` are sklearn roc_auc_score / log_loss (predictions clipped to
[1e-7, 1-1e-7]) over the library's own predict() on test.parquet after the last epoch.

PEER NOTES
- torch-rechub DeepFM: deep_features = [sparse..., dense], fm_features = [sparse...] (the same
  SparseFeature objects, so one embedding table per feature, shared). Its MLP always puts a
  BatchNorm1d after every Linear (no switch), and its first-order term is a Linear over the
  flattened FM embeddings (not 1-dim per-id weights); dense features go only to the MLP.
  CTRTrainer defaults to Adam(lr=1e-3, weight_decay=1e-5): we pass weight_decay=0.
  CTRTrainer.fit always torch.save()s the model to model_path at the end: we point it at a
  temporary directory and keep that save outside train_seconds. Its progress bar is silenced
  (TQDM_DISABLE=1) to match deepctr's verbose=0.
- DeepCTR-Torch DeepFM: linear_feature_columns = dnn_feature_columns = sparse + dense (README
  style); first-order term = 1-dim embedding per id + a weight on the dense value; FM over the
  sparse embeddings; dense value concatenated into the DNN input. dnn_use_bn=False (set
  --deepctr-bn to match rechub's BatchNorm). l2_reg_linear / l2_reg_embedding default to 1e-5 in
  the library: we pass 0. fit() stacks all inputs into ONE float matrix (ids become float32 per
  batch and .long() again in the model; exact below 2**24) and sums the BCE over the batch
  (reduction='sum') rather than averaging. Importing deepctr_torch starts a PyPI version check in
  a thread: we give it a stub ``requests`` so nothing goes on the network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import types
from pathlib import Path

# Silence torch-rechub's per-epoch tqdm bars (deepctr's are off with verbose=0). Must be set before
# any tqdm bar is created; tqdm >= 4.66 reads TQDM_* environment overrides.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

DEFAULT_SPARSE = ("user_id,item_id,gender,age,occupation,zip_prefix,primary_genre,release_decade,"
                  "hour,weekday")
DEFAULT_DENSE = "release_year"
LABEL = "like"
SPLITS = ("train", "val", "test")
EMBED_DIM = 16
HIDDEN = (256, 128)
LR = 1e-3
SEED = 0


# ---- data ------------------------------------------------------------------------------------------------
def load_split(data_dir: Path, sparse: list[str], dense: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{split: {column: numpy array}} with int64 sparse ids, float32 dense values and labels."""
    import pyarrow.parquet as pq

    out = {}
    for split in SPLITS:
        path = data_dir / f"{split}.parquet"
        table = pq.read_table(path, columns=[*sparse, *dense, LABEL])
        cols = {}
        for name in sparse:
            arr = table.column(name).to_numpy()
            if not np.issubdtype(arr.dtype, np.integer):
                raise SystemExit(f"{path}: sparse column {name!r} is {arr.dtype}, expected integer ids")
            cols[name] = np.array(arr, dtype=np.int64)  # writable copy (arrow gives read-only)
        for name in dense:
            arr = table.column(name).to_numpy()
            if arr.dtype == object:
                raise SystemExit(f"{path}: dense column {name!r} must be a scalar float column")
            cols[name] = np.array(arr, dtype=np.float32)
        cols[LABEL] = np.array(table.column(LABEL).to_numpy(), dtype=np.float32)
        out[split] = cols
    return out


def vocab_sizes(data: dict[str, dict[str, np.ndarray]], sparse: list[str]) -> dict[str, int]:
    sizes = {}
    for name in sparse:
        lo = min(int(data[s][name].min()) for s in SPLITS if len(data[s][name]))
        if lo < 0:
            raise SystemExit(f"sparse column {name!r} has negative id {lo}")
        sizes[name] = max(int(data[s][name].max()) for s in SPLITS if len(data[s][name])) + 1
    return sizes


def make_fake(out_dir: Path, train_rows: int, sparse: list[str], dense: list[str]) -> None:
    """Random data with the real columns: ids uniform in [1, vocab), label independent of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab = {"user_id": 944, "item_id": 1683, "gender": 3, "age": 9, "occupation": 22, "zip_prefix": 12,
             "primary_genre": 20, "release_decade": 12, "hour": 25, "weekday": 8}
    rng = np.random.default_rng(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {"train": train_rows, "val": max(train_rows // 8, 1), "test": max(train_rows // 8, 1)}
    for split, n in rows.items():
        cols = {name: rng.integers(1, vocab.get(name, 100), n, dtype=np.int64) for name in sparse}
        cols.update({name: rng.standard_normal(n).astype(np.float32) for name in dense})
        cols[LABEL] = (rng.random(n) < 0.55).astype(np.float32)
        pq.write_table(pa.table(cols), out_dir / f"{split}.parquet")
        print(f"wrote {out_dir / f'{split}.parquet'}: {n} rows", file=sys.stderr)


# ---- timing ----------------------------------------------------------------------------------------------
class EpochClock:
    """Start of the first epoch's loop to end of the last epoch's loop, plus per-epoch times."""

    def __init__(self) -> None:
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.epochs: list[float] = []
        self._t0 = 0.0
        self.cpu_first = 0.0
        self.cpu_last = 0.0

    def begin(self) -> None:
        self._t0 = time.perf_counter()
        if self.first_start is None:
            self.first_start = self._t0
            self.cpu_first = time.process_time()

    def end(self) -> None:
        self.last_end = time.perf_counter()
        self.cpu_last = time.process_time()
        self.epochs.append(self.last_end - self._t0)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of this process (all its threads) over the same window: contention-robust."""
        return self.cpu_last - self.cpu_first

    @property
    def seconds(self) -> float:
        if self.first_start is None or self.last_end is None:
            raise RuntimeError("the training loop never ran")
        return self.last_end - self.first_start


# ---- torch-rechub ----------------------------------------------------------------------------------------
def run_rechub(args, data, sparse, dense, vocab) -> dict:
    import torch
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.ranking import DeepFM
    from torch_rechub.trainers import CTRTrainer
    from torch_rechub.utils.data import DataGenerator

    def xy(split):
        cols = data[split]
        if args.rechub_x == "dataframe":  # as examples/ranking/run_criteo.py passes it (slower per row)
            import pandas as pd

            return pd.DataFrame({k: cols[k] for k in [*sparse, *dense]}), pd.Series(cols[LABEL])
        return {k: cols[k] for k in [*sparse, *dense]}, cols[LABEL]

    sparse_feas = [SparseFeature(name, vocab_size=vocab[name], embed_dim=EMBED_DIM) for name in sparse]
    dense_feas = [DenseFeature(name) for name in dense]
    model = DeepFM(deep_features=sparse_feas + dense_feas, fm_features=sparse_feas,
                   mlp_params={"dims": list(HIDDEN), "dropout": 0.0, "activation": "relu"})
    weight_decay = 1e-5 if args.library_default_reg else 0.0
    ckpt_dir = tempfile.mkdtemp(prefix="rechub-ckpt-")
    trainer = CTRTrainer(model, optimizer_fn=torch.optim.Adam,
                         optimizer_params={"lr": LR, "weight_decay": weight_decay},
                         n_epoch=args.epochs, earlystop_patience=args.epochs + 1, device="cpu",
                         model_path=ckpt_dir)

    x_train, y_train = xy("train")
    x_val, y_val = xy("val")
    x_test, y_test = xy("test")
    dg = DataGenerator(x_train, y_train)
    train_dl, _val_dl, test_dl = dg.generate_dataloader(x_val=x_val, y_val=y_val, x_test=x_test,
                                                        y_test=y_test, batch_size=args.batch_size)

    clock = EpochClock()
    one_epoch = trainer.train_one_epoch

    def timed_epoch(*a, **k):
        clock.begin()
        try:
            return one_epoch(*a, **k)
        finally:
            clock.end()

    trainer.train_one_epoch = timed_epoch
    t0 = time.perf_counter()
    trainer.fit(train_dl)  # no val_dataloader: no validation / early stopping during training
    fit_seconds = time.perf_counter() - t0

    preds = np.asarray(trainer.predict(trainer.model, test_dl), dtype=np.float64).reshape(-1)
    return {"clock": clock, "fit_seconds": fit_seconds, "pred": preds, "y_test": data["test"][LABEL],
            "model": {"class": "torch_rechub.models.ranking.DeepFM",
                      "deep_features": [*sparse, *dense], "fm_features": sparse,
                      "mlp": {"dims": list(HIDDEN), "activation": "relu", "dropout": 0.0,
                              "batchnorm": True},
                      "first_order": "Linear over flattened FM embeddings (dense not included)",
                      "optimizer": f"Adam(lr={LR}, weight_decay={weight_decay})",
                      "loss": "BCELoss (mean)", "dataset_input": args.rechub_x,
                      "n_params": sum(p.numel() for p in model.parameters())}}


# ---- DeepCTR-Torch ---------------------------------------------------------------------------------------
def import_deepctr():
    """Import deepctr_torch with its import-time PyPI version check defused (no network, no print)."""
    real = sys.modules.get("requests")
    stub = types.ModuleType("requests")
    stub.get = lambda *a, **k: types.SimpleNamespace(status_code=0, text="")
    stub.codes = types.SimpleNamespace(ok=200)
    sys.modules["requests"] = stub
    try:
        import deepctr_torch
    finally:
        if real is None:
            del sys.modules["requests"]
        else:
            sys.modules["requests"] = real
    return deepctr_torch


def run_deepctr(args, data, sparse, dense, vocab) -> dict:
    import_deepctr()
    from deepctr_torch.callbacks import Callback
    from deepctr_torch.inputs import DenseFeat, SparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM

    columns = ([SparseFeat(name, vocabulary_size=vocab[name], embedding_dim=EMBED_DIM) for name in sparse]
               + [DenseFeat(name, 1) for name in dense])
    names = get_feature_names(columns)
    l2 = 1e-5 if args.library_default_reg else 0.0
    model = DeepFM(linear_feature_columns=columns, dnn_feature_columns=columns, dnn_hidden_units=HIDDEN,
                   l2_reg_linear=l2, l2_reg_embedding=l2, l2_reg_dnn=0, seed=SEED, dnn_dropout=0,
                   dnn_activation="relu", dnn_use_bn=args.deepctr_bn, task="binary", device="cpu")
    model.compile("adam", "binary_crossentropy")  # "adam" = torch.optim.Adam(params), lr 1e-3

    clock = EpochClock()

    class Clock(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            clock.begin()

        def on_epoch_end(self, epoch, logs=None):
            clock.end()

    train_x = {name: data["train"][name] for name in names}
    t0 = time.perf_counter()
    model.fit(train_x, data["train"][LABEL], batch_size=args.batch_size, epochs=args.epochs, verbose=0,
              shuffle=True, callbacks=[Clock()])
    fit_seconds = time.perf_counter() - t0

    test_x = {name: data["test"][name] for name in names}
    preds = model.predict(test_x, batch_size=args.batch_size).reshape(-1)
    return {"clock": clock, "fit_seconds": fit_seconds, "pred": preds, "y_test": data["test"][LABEL],
            "model": {"class": "deepctr_torch.models.DeepFM",
                      "linear_feature_columns": names, "dnn_feature_columns": names,
                      "mlp": {"dims": list(HIDDEN), "activation": "relu", "dropout": 0.0,
                              "batchnorm": bool(args.deepctr_bn)},
                      "first_order": "1-dim embedding per sparse id + weight on dense value",
                      "optimizer": f"Adam(lr={LR}), l2_reg_linear={l2}, l2_reg_embedding={l2}",
                      "loss": "binary_cross_entropy (reduction='sum')",
                      "n_params": sum(p.numel() for p in model.parameters())}}


# ---- main ------------------------------------------------------------------------------------------------
def metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return auc, float(log_loss(y, p, labels=[0.0, 1.0]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", choices=("rechub", "deepctr"))
    ap.add_argument("--data", type=Path, help="directory with train/val/test.parquet")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, help="result JSON path")
    ap.add_argument("--sparse-features", default=DEFAULT_SPARSE, help="comma-separated int64 id columns")
    ap.add_argument("--dense-features", default=DEFAULT_DENSE,
                    help="comma-separated float columns ('' for none)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--deepctr-bn", action="store_true",
                    help="deepctr: BatchNorm in the DNN (rechub's MLP always has it)")
    ap.add_argument("--library-default-reg", action="store_true",
                    help="keep the libraries' default regularisation (rechub weight_decay 1e-5, "
                         "deepctr l2_reg_linear/embedding 1e-5) instead of none")
    ap.add_argument("--rechub-x", choices=("dict", "dataframe"), default="dict",
                    help="rechub: feed DataGenerator a dict of numpy arrays (its documented TorchDataset "
                         "input) or a pandas DataFrame (as its run_criteo.py example does)")
    ap.add_argument("--make-fake", type=Path, metavar="DIR",
                    help="write a random train/val/test split with the real columns to DIR and exit")
    ap.add_argument("--fake-train-rows", type=int, default=50_000)
    args = ap.parse_args(argv)
    if args.make_fake is None:
        missing = [o for o, v in (("--library", args.library), ("--data", args.data), ("--out", args.out))
                   if v is None]
        if missing:
            ap.error("required: " + ", ".join(missing))
        if args.batch_size < 1 or args.epochs < 1:
            ap.error("--batch-size and --epochs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sparse = [c for c in args.sparse_features.split(",") if c]
    dense = [c for c in args.dense_features.split(",") if c]
    if args.make_fake is not None:
        make_fake(args.make_fake, args.fake_train_rows, sparse, dense)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)

    t_read = time.perf_counter()
    data = load_split(args.data, sparse, dense)
    vocab = vocab_sizes(data, sparse)
    read_seconds = time.perf_counter() - t_read

    runner = run_rechub if args.library == "rechub" else run_deepctr
    load_before = os.getloadavg()[0]
    # The libraries print progress to stdout; keep our stdout for the one-line summary.
    with contextlib.redirect_stdout(sys.stderr):
        res = runner(args, data, sparse, dense, vocab)

    import importlib.metadata as md

    dist = "torch-rechub" if args.library == "rechub" else "deepctr-torch"
    train_rows = int(len(data["train"][LABEL]))
    clock: EpochClock = res["clock"]
    auc, logloss = metrics(res["y_test"], res["pred"])
    result = {
        "library": args.library,
        "version": md.version(dist),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "train_rows": train_rows,
        "train_seconds": clock.seconds,
        "samples_per_second": train_rows * args.epochs / clock.seconds,
        "test_auc": auc,
        "test_logloss": logloss,
        # extras
        "test_rows": int(len(res["y_test"])),
        "epoch_seconds": clock.epochs,
        "fit_seconds": res["fit_seconds"],
        "train_cpu_seconds": clock.cpu_seconds,
        "loadavg_1min": [load_before, os.getloadavg()[0]],  # before/after; > threads = shared CPUs
        "cpu_count": os.cpu_count(),
        "read_seconds": read_seconds,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "sparse_features": sparse,
        "dense_features": dense,
        "vocab_sizes": vocab,
        "embedding_dim": EMBED_DIM,
        "model": res["model"],
        "timing": "train_seconds: perf_counter from the start of the first epoch's DataLoader loop to the "
                  "end of the last epoch's loop (data loading included; dataset construction, model build, "
                  "parquet read, checkpoint and test eval excluded); fit_seconds: the whole library fit call",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("library", "batch_size", "epochs", "train_seconds",
                                             "samples_per_second", "test_auc", "test_logloss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
