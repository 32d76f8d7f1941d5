"""The Lightning CLI behind ``rec-dist fit|validate|test|predict``.

Configuration is the API: the task, its model, the data module, the trainer,
its logger and callbacks are all ``class_path`` + ``init_args`` in YAML. The
schema is not repeated in model configs: it is linked from ``data.schema``
into the task when the classes are instantiated.
"""

from __future__ import annotations

import sys

from rec_dist.quiet import quiet_startup

DEFAULT_MAX_EPOCHS = 5  # rec-dist's trainer default (Lightning's own is 1000)


def _task_checkpoint():
    """The best-checkpoint callback: it watches the task's own ``monitor = (metric, mode)`` (ranking tasks
    ``val/auc``, retrieval ``val/recall_at_K``), read from the LightningModule when the trainer sets up."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    class TaskCheckpoint(ModelCheckpoint):
        def setup(self, trainer, pl_module, stage: str) -> None:
            monitor, mode = getattr(pl_module, "monitor", (self.monitor, self.mode))
            if mode not in ("min", "max"):
                raise ValueError(f"{type(pl_module).__name__}.monitor: mode must be 'min' or 'max', got {mode!r}")
            if (monitor, mode) != (self.monitor, self.mode):
                self.monitor, self.mode = monitor, mode
                self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)
            super().setup(trainer, pl_module, stage)

    return TaskCheckpoint(monitor="val/auc", mode="max", filename="best-{epoch}")


def _trainer_defaults() -> dict:
    """Defaults a config may override; the callbacks here are always added."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rec_dist.tracking.plots import RunPlots
    from rec_dist.tracking.resume import RecordMLflowRun

    return {
        "logger": {"class_path": "rec_dist.tracking.mlflow.MLflowLogger"},
        "callbacks": [
            RunPlots(),
            _task_checkpoint(),
            # The newest epoch and last.ckpt: a monitored callback rewrites last.ckpt only when it saved a
            # new best (Lightning 2.6), so resuming from it would go back to the best epoch.
            ModelCheckpoint(filename="latest-{epoch}", save_top_k=1, save_last=True),
            RecordMLflowRun(),  # the run id in every checkpoint: a resumed fit continues the run
        ],
        "max_epochs": DEFAULT_MAX_EPOCHS,
        "log_every_n_steps": 10,
        "enable_model_summary": False,
        "deterministic": False,
        # no_grad instead of inference_mode for eval: FBGEMM's fused CPU lookups
        # (model.init_args.sparse_optimizer) cannot run on inference tensors.
        "inference_mode": False,
    }


def build_cli_class():
    from lightning.pytorch.cli import LightningCLI

    import rec_dist.distributed.strategy  # noqa: F401  (registers --trainer.strategy torchrec)
    from rec_dist.tracking.resume import ResumingConfigLogger

    class RecDistCLI(LightningCLI):
        def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
            super().__init__(
                save_config_callback=ResumingConfigLogger,
                save_config_kwargs={"overwrite": True},
                trainer_defaults=_trainer_defaults(),
                seed_everything_default=42,
                subclass_mode_model=True,
                subclass_mode_data=True,
                auto_configure_optimizers=False,
                parser_kwargs={"parser_mode": "yaml"},
                args=args,
                run=run,
            )

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.schema", "model.init_args.schema", apply_on="instantiate")
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="after `fit`, evaluate the best checkpoint on the test split (same MLflow run)",
            )

        def _instantiate_trainer(self, config: dict, callbacks: list):
            # A rich progress bar unless the config turns progress bars off; predict writes parquet.
            from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

            if self.subcommand == "predict":
                from rec_dist.tasks.predictions import ParquetPredictionWriter

                if not any(isinstance(c, ParquetPredictionWriter) for c in callbacks):
                    callbacks = [*callbacks, ParquetPredictionWriter()]
            if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks + list(config.get("callbacks") or [])
            ):
                callbacks = [*callbacks, RichProgressBar()]
            ckpt_path = self.config.get(self.subcommand, {}).get("ckpt_path") if self.subcommand == "fit" else None
            if ckpt_path:
                from rec_dist.tracking.resume import resume_fit

                logger = config.get("logger")
                resume_fit(ckpt_path, list(logger) if isinstance(logger, list | tuple) else [logger])
            return super()._instantiate_trainer(config, callbacks)

        def after_fit(self) -> None:
            config = self.config.get(self.subcommand, self.config)
            datamodule = self.datamodule
            checkpoint = self.trainer.checkpoint_callback
            if self.trainer.is_global_zero:
                last = next((c.last_model_path for c in self.trainer.checkpoint_callbacks if c.last_model_path), "")
                if last:
                    print(f"last checkpoint: {last} (what --ckpt_path resumes from)")
            if config.get("test_after_fit", True) and getattr(datamodule, "splits", {}).get("test") is not None:
                # The path itself, not "best": with several ModelCheckpoint callbacks (best, latest) Lightning
                # warns on every fit that "best" means the first one's.
                ckpt = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
                if ckpt and self.trainer.is_global_zero:
                    print(
                        f"best {checkpoint.monitor} = {float(checkpoint.best_model_score):.4f} "
                        f"({checkpoint.best_model_path}); testing it"
                    )
                self.trainer.test(self.model, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)

            # The final model (best checkpoint, else last) into the run as an MLflow model, from rank 0.
            from lightning.pytorch.loggers import MLFlowLogger

            loggers = [lg for lg in self.trainer.loggers if isinstance(lg, MLFlowLogger)]
            final = checkpoint and (checkpoint.best_model_path or checkpoint.last_model_path)
            if not self.trainer.is_global_zero or not loggers:
                return
            if not final:
                print("no checkpoint was saved: the run has no final model (enable a ModelCheckpoint)")
                return
            from rec_dist.tracking.model_registry import log_final_model

            text = self._parser(self.subcommand).dump(config, skip_none=False)
            for logger in loggers:
                uri = getattr(logger, "_tracking_uri", None)
                info = log_final_model(logger.run_id, text, final, tracking_uri=uri, exporter=export_checkpoint)
                print(f"final model {final} logged to MLflow run {logger.run_id} as {info.model_uri}")

    return RecDistCLI


def export_checkpoint(config: str, ckpt_path: str, output: str):
    """``rec-dist export``: build the task from ``config`` (unsharded), load ``ckpt_path``, write ``output``
    (``rec_dist.tracking.exported`` has the file's format and ``load_exported``)."""
    from rec_dist.quiet import quiet_startup
    from rec_dist.tracking.exported import write_exported

    quiet_startup()
    cli = build_cli_class()(args=["--config", config, "--trainer.logger", "false"], run=False)
    return write_exported(cli.model, cli.config.model.init_args.model, ckpt_path, output)


def run(argv: list[str]) -> None:
    """Run one Lightning subcommand; a bad config exits with the parser's message."""
    quiet_startup()
    from rec_dist.errors import RecDistError

    cli_class = build_cli_class()
    try:
        cli_class(args=argv)
    except Exception as err:  # noqa: BLE001  (re-raised unless it is, or was caused by, bad user input)
        cause = _input_error(err, RecDistError)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def _input_error(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``err`` or the first error of its cause chain that is a ``kind``: jsonargparse wraps what a class
    raises while it is instantiated (with the whole config) into its own error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
