"""Any rec_dist training config as a Ray Train job: N workers, sharded checkpoints, restarts.

    python jobs/train.py --config configs/movielens/deepfm_torchrec.yaml --num_workers 2 \
        [--use_gpu] [--storage_path /mnt/shared/ray] [--max_failures 3] [--tracking_uri URI] \
        [Lightning CLI overrides, e.g. --trainer.max_epochs 3]

The driver creates the MLflow run first and hands its id to the workers, so
a worker group that Ray restarts after a failure keeps logging into the same
run. Each worker builds the Lightning CLI from the config with Ray's pieces
swapped in: the strategy becomes its Ray variant (``RayTorchRecStrategy``
for ``torchrec`` configs, else ``RayDDPStrategy``), the cluster environment
is Ray's, ``trainer.devices`` is replaced by ``--num_workers``, and every
epoch end reports the metrics and a checkpoint to Ray. A torchrec checkpoint
is a directory of DCP shards, one file per rank; Ray merges the workers'
files into one checkpoint directory, which is what a restart resumes from
(``FailureConfig(max_failures)``). After ``fit`` the workers run the CLI's
``after_fit``: the test pass and the final model logged to the MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rec_dist.tracking.mlflow import default_tracking_uri
from rec_dist.tune.checkpoints import CHECKPOINT_NAME, lightning_checkpoints, resolve_checkpoint

STAGES = ("fit", "validate", "test")


@dataclass
class RayTrainSettings:
    """How the job runs on Ray (the training itself is the config's business)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None  # Ray's default (~/ray_results); a shared path or URI on clusters
    name: str | None = None
    max_failures: int = 3
    tracking_uri: str | None = None
    keep_checkpoints: int = 2
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RayRun:
    """What a finished Ray Train job left: the MLflow run and Ray's result (checkpoint, last metrics)."""

    run_id: str
    tracking_uri: str
    result: Any
    checkpoint_root: str | None = None  # where the config's ModelCheckpoint callbacks wrote (best, last)


def resolve_tracking_uri(flag: str | None, configured: str | None) -> str:
    """The MLflow store of a Ray run: ``--tracking_uri``, else the config's logger, else the default; absolute."""
    return absolute_tracking_uri(flag or configured or default_tracking_uri())


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``: workers do not share the driver's directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def temporary_store_warning(tracking_uri: str, cwd: str) -> str | None:
    """A warning when a job's SQLite store lies inside Ray's temporary copy of the working directory
    (``ray job submit --working-dir .`` runs in ``.../runtime_resources/...``: the file would vanish with
    it); None for a store outside that copy, a server, or a run outside a Ray job."""
    prefix = "sqlite:///"
    if "runtime_resources" not in cwd or not tracking_uri.startswith(prefix):
        return None
    store = Path(tracking_uri[len(prefix):]).resolve()
    if not store.is_relative_to(Path(cwd).resolve()):
        return None
    return (f"warning: MLflow store {tracking_uri} lies in Ray's temporary copy of the working directory; "
            "pass --tracking_uri (an http:// server or an absolute sqlite:////path outside it)")


def cli_override(cli_args: Sequence[str], key: str) -> str | None:
    """The value of ``--key V`` / ``--key=V`` in Lightning CLI arguments (last one wins)."""
    value = None
    for i, arg in enumerate(cli_args):
        if arg == f"--{key}" and i + 1 < len(cli_args):
            value = cli_args[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def logger_names(config_path: str, cli_args: Sequence[str]) -> tuple[str, str | None, str | None]:
    """Experiment, run name and tracking URI the config's MLflow logger would use."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    logger = (config.get("trainer") or {}).get("logger")
    init_args = (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
    experiment = cli_override(cli_args, "trainer.logger.init_args.experiment_name") or init_args.get(
        "experiment_name", "rec_dist"
    )
    run_name = cli_override(cli_args, "trainer.logger.init_args.run_name") or init_args.get("run_name")
    tracking_uri = cli_override(cli_args, "trainer.logger.init_args.tracking_uri") or init_args.get("tracking_uri")
    return experiment, run_name, tracking_uri


def configured_checkpoint_dir(config_path: str, cli_args: Sequence[str]) -> str | None:
    """The ``checkpoint_dir`` the config's MLflow logger names (``--trainer.logger.init_args.checkpoint_dir``
    wins), or None."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    logger = (config.get("trainer") or {}).get("logger")
    init_args = (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
    return cli_override(cli_args, "trainer.logger.init_args.checkpoint_dir") or init_args.get("checkpoint_dir")


def create_mlflow_run(tracking_uri: str, experiment: str, run_name: str | None, parent_run_id: str | None,
                      tags: dict[str, str]) -> str:
    """A RUNNING MLflow run (child of ``parent_run_id`` when given) for the workers to continue."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    all_tags = dict(tags)
    if run_name:
        all_tags[MLFLOW_RUN_NAME] = run_name
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id


def run_on_ray(config: str, cli_args: Sequence[str], settings: RayTrainSettings, *, stage: str = "fit",
               ckpt_path: str | None = None, parent_run_id: str | None = None, run_id: str | None = None,
               run_name: str | None = None, run_config_callbacks: Sequence[Any] = ()) -> RayRun:
    """Run one Lightning stage of ``config`` on a Ray Train worker group; returns when it has finished.

    Needs a Ray cluster (``ray.init()`` is called with defaults when none is
    connected: a local one, or the cluster of a ``ray job submit``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not Path(config).is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    if settings.num_workers < 1:
        raise ValueError(f"--num_workers must be >= 1, got {settings.num_workers}")
    experiment, configured_name, configured_uri = logger_names(config, cli_args)
    run_name = run_name or configured_name
    tracking_uri = resolve_tracking_uri(settings.tracking_uri, configured_uri)
    warning = temporary_store_warning(tracking_uri, os.getcwd())
    if warning:
        print(warning, file=sys.stderr)
    if run_id is None:
        tags = {"rec_dist.stage": stage, "rec_dist.num_workers": str(settings.num_workers), **settings.tags}
        run_id = create_mlflow_run(tracking_uri, experiment, run_name, parent_run_id, tags)
    print(f"MLflow run {run_id} ({tracking_uri}, experiment {experiment!r})")
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    name = settings.name or f"{run_name or 'rec_dist'}-{stage}-{run_id[:8]}"
    storage = settings.storage_path
    if storage is not None and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    # Lightning's own checkpoints (ModelCheckpoint: best, last) next to Ray's, not in the job's temporary copy
    local_storage = str(Path(storage or "~/ray_results").expanduser()) if "://" not in (storage or "") else None
    if storage is None:
        print(f"Ray results and checkpoints: {local_storage}/{name} (Ray's default; --storage_path to change)")
    loop_config = {
        "config_text": Path(config).read_text(),
        "config_name": Path(config).name,
        "cli_args": list(cli_args),
        "cwd": os.getcwd(),
        "stage": stage,
        "ckpt_path": ckpt_path,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "use_gpu": settings.use_gpu,
        "checkpoint_root": str(Path(local_storage) / name / "lightning") if local_storage else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker={"CPU": settings.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints),
            callbacks=list(run_config_callbacks) or None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        _terminate(tracking_uri, run_id, "FAILED")
        raise
    configured = configured_checkpoint_dir(config, cli_args)  # where continue_run_logger sends the workers
    root = configured if configured and Path(configured).is_absolute() else loop_config["checkpoint_root"]
    return RayRun(run_id=run_id, tracking_uri=tracking_uri, result=result, checkpoint_root=root)


def _terminate(tracking_uri: str, run_id: str, status: str) -> None:
    """End the run with ``status``; FAILED only while it is still RUNNING (a Tune trial the scheduler
    stopped is already KILLED by the study when its interrupted driver gets here)."""
    from mlflow import MlflowClient

    from rec_dist.tracking.mlflow import run_is_running

    client = MlflowClient(tracking_uri)
    if status == "FAILED" and not run_is_running(client, run_id):
        return
    client.set_terminated(run_id, status)


# ---- worker side ---------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the Lightning CLI of the config, with Ray's strategy, environment and reports."""
    from rec_dist.quiet import quiet_startup

    quiet_startup()
    logging.getLogger().setLevel(logging.WARNING)  # Ray workers log INFO by default: FBGEMM's per-table chatter
    import ray.train
    from ray.train.lightning import prepare_trainer

    if Path(loop_config["cwd"]).is_dir():  # same node or shared FS: relative paths of the config still hold
        os.chdir(loop_config["cwd"])
    # Every MLflow client of this worker (the config's logger too) talks to the driver's store.
    os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / loop_config["config_name"]
        config_path.write_text(loop_config["config_text"])
        cli = ray_cli_class(loop_config)(args=["--config", str(config_path), *loop_config["cli_args"]], run=False)
    trainer = prepare_trainer(cli.trainer)
    stage = loop_config["stage"]
    if stage != "fit":
        getattr(trainer, stage)(cli.model, datamodule=cli.datamodule, ckpt_path=loop_config["ckpt_path"],
                                weights_only=False)
        return
    checkpoint = ray.train.get_checkpoint()
    with short_peer_loss(ray.train.get_context().get_world_rank()):
        if checkpoint is None:
            trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=loop_config["ckpt_path"], weights_only=False)
        else:  # a restart after a failure: resume from the last reported checkpoint
            with checkpoint.as_directory() as ckpt_dir:
                resume = str(Path(ckpt_dir) / CHECKPOINT_NAME)
                if ray.train.get_context().get_world_rank() == 0:
                    from rec_dist.tracking.resume import checkpoint_summary

                    summary = checkpoint_summary(resume)
                    print(f"worker group restarted: resuming from {summary.describe()}; training continues with "
                          f"epoch {summary.epoch + 1} in MLflow run {loop_config['run_id']}", flush=True)
                trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume, weights_only=False)
    cli.after_fit()


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo, when a rank died


class PeerWorkerLost(RuntimeError):
    """A surviving worker's collective failed because another worker died: Ray restarts the group."""


@contextmanager
def short_peer_loss(rank: int) -> Iterator[None]:
    """A collective that failed because a peer worker died is expected before a restart: say so in one
    line instead of the ~150-line gloo traceback through Lightning that each surviving worker printed."""
    try:
        yield
    except RuntimeError as err:
        if not any(text in str(err) for text in PEER_LOST):
            raise
        first = str(err).splitlines()[0][:200]
        raise PeerWorkerLost(f"rank {rank}: another worker of the group died ({first}); "
                             "Ray restarts the group from the last checkpoint (--max_failures)") from None


def ray_cli_class(loop_config: dict[str, Any]):
    """RecDistCLI whose trainer runs inside a Ray Train worker group."""
    from ray.train.lightning import RayLightningEnvironment, RayTrainReportCallback

    from rec_dist.distributed.ray_strategy import ray_strategy_for
    from rec_dist.lightning_cli import build_cli_class
    from rec_dist.tracking.mlflow import MLflowLogger

    base = build_cli_class()

    class RayRecDistCLI(base):
        def _instantiate_trainer(self, config: dict, callbacks: list):
            config = dict(config)
            manual = not getattr(self.model, "automatic_optimization", True)
            config["strategy"] = ray_strategy_for(config.get("strategy"), manual_optimization=manual)
            config["plugins"] = [RayLightningEnvironment()]
            config["devices"] = "auto"
            config["num_nodes"] = 1
            config["accelerator"] = "gpu" if loop_config["use_gpu"] else "cpu"
            logger = config.get("logger")
            if isinstance(logger, MLflowLogger) or logger in (None, True):
                config["logger"] = continue_run_logger(logger, loop_config)
            return super()._instantiate_trainer(config, [*callbacks, RayTrainReportCallback()])

    return RayRecDistCLI


def continue_run_logger(logger, loop_config: dict[str, Any]):
    """The config's MLflow logger, pointed at the run the driver created."""
    from rec_dist.tracking.mlflow import MLflowLogger

    experiment = getattr(logger, "_experiment_name", "rec_dist")
    checkpoint_dir = Path(getattr(logger, "checkpoint_dir", "checkpoints"))
    if not checkpoint_dir.is_absolute() and loop_config.get("checkpoint_root"):
        checkpoint_dir = Path(loop_config["checkpoint_root"])  # a relative path would land in Ray's temp copy
    return MLflowLogger(experiment_name=experiment, tracking_uri=loop_config["tracking_uri"],
                        checkpoint_dir=str(checkpoint_dir.resolve()), run_id=loop_config["run_id"])


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str], description: str, stage: str = "fit") -> tuple[argparse.Namespace, list[str]]:
    """Runner options; everything it does not know goes to the Lightning CLI."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="a rec_dist training config (Lightning CLI YAML)")
    parser.add_argument("--num_workers", type=int, default=2, help="Ray Train workers (replaces trainer.devices)")
    parser.add_argument("--use_gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus_per_worker", type=float, default=1.0)
    parser.add_argument("--storage_path", default=None, help="Ray checkpoints (shared path or URI on clusters)")
    parser.add_argument("--name", default=None, help="Ray run name (default: from the MLflow run)")
    parser.add_argument("--max_failures", type=int, default=3 if stage == "fit" else 0,
                        help="worker-group restarts before giving up")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db in the working directory, MLflow's default)")
    if stage != "fit":
        parser.add_argument("--ckpt_path", required=True, help="checkpoint to evaluate: a Ray run directory (its "
                            "latest checkpoint), a Ray checkpoint, a torchrec checkpoint dir or a .ckpt file")
        parser.add_argument("--stage", choices=("validate", "test"), default="test")
        parser.add_argument("--run_id", default=None, help="log into this MLflow run (default: a new run)")
    return parser.parse_known_args(list(argv))


def settings_from(args: argparse.Namespace) -> RayTrainSettings:
    return RayTrainSettings(num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                            storage_path=args.storage_path, name=args.name, max_failures=args.max_failures,
                            tracking_uri=args.tracking_uri)


def main(argv: Sequence[str] | None = None) -> None:
    from rec_dist.quiet import quiet_startup

    quiet_startup()
    args, cli_args = parse_args(sys.argv[1:] if argv is None else argv, "Train a rec_dist config on Ray Train")
    run = run_on_ray(args.config, cli_args, settings_from(args))
    metrics = {k: v for k, v in (run.result.metrics or {}).items() if isinstance(v, int | float)}
    print(f"finished: MLflow run {run.run_id}; last reported metrics {metrics}")
    print_checkpoints(run)


def print_checkpoints(run: RayRun) -> None:
    """Where the job's checkpoints are: what ``jobs/evaluate.py --ckpt_path`` takes."""
    if getattr(run.result, "path", None):
        print(f"Ray run directory: {run.result.path} (jobs/evaluate.py --ckpt_path takes it: its latest checkpoint)")
    if run.result.checkpoint is not None:
        print(f"final checkpoint: {run.result.checkpoint.path}/{CHECKPOINT_NAME}")
    found = lightning_checkpoints(run.checkpoint_root, run.run_id)
    if "best" in found:
        print(f"best checkpoint: {found['best']}")


def evaluate_main(argv: Sequence[str] | None = None) -> None:
    from rec_dist.quiet import quiet_startup

    quiet_startup()
    args, cli_args = parse_args(sys.argv[1:] if argv is None else argv, "Evaluate a checkpoint on Ray Train", "eval")
    from rec_dist.errors import RecDistError

    try:  # before Ray starts any worker
        ckpt = resolve_checkpoint(args.ckpt_path)
    except RecDistError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"evaluating checkpoint {ckpt}")
    run = run_on_ray(args.config, cli_args, settings_from(args), stage=args.stage, ckpt_path=str(ckpt),
                     run_id=args.run_id)
    print(f"finished: {args.stage} logged to MLflow run {run.run_id}")
