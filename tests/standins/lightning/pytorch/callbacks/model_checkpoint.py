"""Stand-in ModelCheckpoint with the behaviour of lightning 2.x that stopstep relies on:

- ``dirpath`` is resolved in ``setup`` (``default_root_dir/checkpoints`` when not given);
- saves in ``on_train_batch_end`` every ``every_n_train_steps`` and in ``on_train_epoch_end``
  every ``every_n_epochs`` (the default when neither is given: every epoch), never twice at
  the same global step (``_last_global_step_saved``);
- names files with ``format_checkpoint_name(metrics)`` from ``_monitor_candidates``:
  ``{epoch}-{step}`` by default, ``name=value`` with ``auto_insert_metric_name``, ``-vN``
  when the name is taken;
- ``file_exists`` is rank 0's answer, broadcast;
- every save goes through ``_save_checkpoint`` (which records ``_last_global_step_saved`` and
  ``_last_checkpoint_saved``), the top-k one through ``_save_topk_checkpoint`` (``save_top_k=1``
  removes the one it replaces), and ``save_last`` writes ``last.ckpt`` through
  ``_save_last_checkpoint`` after each of its own saves, and at ``on_train_end`` only if
  nothing was saved at all: a last.ckpt written earlier is *not* brought up to date there.
"""

import os
import re

from lightning.pytorch.callbacks.callback import Checkpoint

_FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


class ModelCheckpoint(Checkpoint):
    FILE_EXTENSION = ".ckpt"

    CHECKPOINT_NAME_LAST = "last"

    def __init__(self, dirpath=None, filename=None, monitor=None, save_last=None, save_top_k=1,
                 save_weights_only=False, auto_insert_metric_name=True, every_n_train_steps=None,
                 every_n_epochs=None):
        self.dirpath = os.path.realpath(dirpath) if dirpath else None
        self.filename = filename
        self.monitor = monitor
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.auto_insert_metric_name = auto_insert_metric_name
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs, every_n_train_steps = 1, 0
        self._every_n_train_steps = every_n_train_steps or 0
        self._every_n_epochs = every_n_epochs or 0
        self._last_global_step_saved = 0
        self._last_checkpoint_saved = ""
        self.best_model_path = ""
        self.last_model_path = ""
        self.saved = []  # every path saved, for the tests

    def setup(self, trainer, pl_module, stage):
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._should_skip_saving_checkpoint(trainer):
            return
        if self._every_n_train_steps < 1 or trainer.global_step % self._every_n_train_steps != 0:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer, pl_module):
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        if self._last_global_step_saved == trainer.global_step:
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer, pl_module):
        if self.save_last and not self._last_checkpoint_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _should_skip_saving_checkpoint(self, trainer):
        return self._last_global_step_saved == trainer.global_step

    def _monitor_candidates(self, trainer):
        candidates = dict(trainer.callback_metrics)
        candidates["epoch"] = trainer.current_epoch
        candidates["step"] = trainer.global_step
        return candidates

    def _save_topk_checkpoint(self, trainer, candidates):
        if self.save_top_k == 0:
            return
        path = self.format_checkpoint_name(candidates)
        version = 1
        while self.file_exists(path, trainer) and path != self.best_model_path:
            path = self.format_checkpoint_name(candidates, ver=version)
            version += 1
        previous, self.best_model_path = self.best_model_path, path
        self._save_checkpoint(trainer, path)
        if self.save_top_k == 1 and previous and previous != path and os.path.exists(previous):
            os.remove(previous)

    def _save_checkpoint(self, trainer, filepath):
        trainer.save_checkpoint(filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self.saved.append(filepath)

    def _save_last_checkpoint(self, trainer, candidates):
        if not self.save_last:
            return
        self.last_model_path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        self._save_checkpoint(trainer, self.last_model_path)

    def format_checkpoint_name(self, metrics, filename=None, ver=None):
        def fill(match):
            name, spec = match.group(1), match.group(2) or ""
            text = format(metrics.get(name, 0), spec)
            return f"{name}={text}" if self.auto_insert_metric_name else text

        name = _FIELD.sub(fill, filename or self.filename or "{epoch}-{step}")
        if ver is not None:
            name += f"-v{ver}"
        name += self.FILE_EXTENSION
        return os.path.join(self.dirpath, name) if self.dirpath else name

    def file_exists(self, filepath, trainer):
        return trainer.strategy.broadcast(os.path.exists(filepath))
