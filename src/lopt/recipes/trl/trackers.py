"""--report_to inside a TRL run: wandb started in the run's folder, lopt's config in each tracker that TRL's
integrations start."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from lopt.config import RunConfig
from lopt.config.report_to import TRACKERS
from lopt.training.trackers import (
    CONFIG_TEXT,
    config_text,
    import_tracker,
    start_wandb,
)


@contextmanager
def trl_reporting(trainer, config: RunConfig):
    """Around `trainer.train()` of a run whose TRL arguments came from `trl_arguments`, on the main process:
    start wandb in `<output_dir>/wandb/`, offline unless WANDB_MODE says otherwise (transformers'
    WandbCallback would start it in ./wandb, online, and leave it open), and finish it after; and add lopt's
    config to each tracker's once transformers' integrations have started them (`_LoptConfig`)."""
    names = [name for name in trainer.args.report_to if name in TRACKERS]
    if not names or not trainer.is_world_process_zero():
        yield
        return
    trainer.add_callback(_LoptConfig(trainer, config.to_json(), names))
    wandb_run = None
    if "wandb" in names:
        wandb = import_tracker("wandb")
        if wandb.run is None:  # a run the user started stays theirs, as with transformers
            wandb_run = start_wandb(wandb, Path(trainer.args.output_dir), trainer.args.project, trainer.args.run_name)
    try:
        yield
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    if wandb_run is not None:
        wandb_run.finish()


class _LoptConfig(TrainerCallback):
    """Adds lopt's run config to the trackers that transformers' integrations start in their on_train_begin
    (added after them, this callback runs after them); lopt's values win over TRL's arguments of the same name."""

    def __init__(self, trainer, values: dict, names: list[str]):
        self.trainer, self.values, self.names = trainer, values, names

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if "wandb" in self.names and import_tracker("wandb").run is not None:
            import_tracker("wandb").run.config.update(self.values, allow_val_change=True)
        if "trackio" in self.names:
            import_tracker("trackio").config.update(self.values)  # the run TrackioCallback just started
        if "tensorboard" in self.names:
            from transformers.integrations import TensorBoardCallback

            for callback in self.trainer.callback_handler.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                    callback.tb_writer.add_text(CONFIG_TEXT, config_text(self.values), state.global_step)
