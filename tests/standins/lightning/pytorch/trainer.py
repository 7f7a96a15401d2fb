"""Stand-in Trainer with the fit loop order of lightning 2.x.

Per batch: training_step, global_step += 1 at each accumulation boundary, every callback's
on_train_batch_end (checkpoint callbacks last), then the epoch loop's done check
(max_steps, or should_stop unless min_steps is not reached yet). Per epoch: the epoch's
metrics into callback_metrics (``train_loss_epoch``, as ``self.log(..., on_epoch=True)``
gives), every callback's on_train_epoch_end, the epoch counted, then the fit loop's
done check. Then on_train_end and fit returns normally.
"""

import json
import os

from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint


class _SingleDeviceStrategy:
    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None):
        pass


class Trainer:
    def __init__(self, callbacks=None, max_steps=-1, max_epochs=None, min_steps=None, enable_checkpointing=True,
                 default_root_dir=None, accumulate_grad_batches=1):
        self.max_steps = max_steps
        self.max_epochs = 1000 if max_epochs is None else max_epochs
        self.min_steps = min_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.default_root_dir = default_root_dir or os.getcwd()
        self.callbacks = list(callbacks or [])
        if enable_checkpointing and not self.checkpoint_callbacks:
            self.callbacks.append(ModelCheckpoint())
        # checkpoint callbacks always run last
        self.callbacks = ([c for c in self.callbacks if not isinstance(c, Checkpoint)]
                          + [c for c in self.callbacks if isinstance(c, Checkpoint)])
        self.strategy = _SingleDeviceStrategy()
        self.is_global_zero = True
        self.global_step = 0
        self.current_epoch = 0
        self.should_stop = False
        self.callback_metrics = {}
        self.saved = []  # every checkpoint written, for the tests

    @property
    def checkpoint_callbacks(self):
        return [c for c in self.callbacks if isinstance(c, Checkpoint)]

    def fit(self, model, train_dataloaders):
        self.should_stop = False
        self._call("setup", model, "fit")
        self._call("on_train_start", model)
        while not self._fit_done():
            self._call("on_train_epoch_start", model)
            losses = []
            for batch_idx, batch in enumerate(train_dataloaders):
                outputs = model.training_step(batch, batch_idx)
                losses.append(outputs["loss"])
                if (batch_idx + 1) % self.accumulate_grad_batches == 0:
                    self.global_step += 1
                    self.callback_metrics["train_loss"] = outputs["loss"]
                self._call("on_train_batch_end", model, outputs, batch, batch_idx)
                if self._epoch_done():
                    break
            self.callback_metrics["train_loss_epoch"] = sum(losses) / len(losses)
            self._call("on_train_epoch_end", model)
            self.current_epoch += 1
        self._call("on_train_end", model)

    def _epoch_done(self):
        if self.max_steps != -1 and self.global_step >= self.max_steps:
            return True
        if self.should_stop:
            if self.min_steps is not None and self.global_step < self.min_steps:
                self.should_stop = False  # Lightning ignores the stop until min_steps
                return False
            return True
        return False

    def _fit_done(self):
        return ((self.max_steps != -1 and self.global_step >= self.max_steps)
                or self.current_epoch >= self.max_epochs or self.should_stop)

    def _call(self, hook, *args):
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def save_checkpoint(self, filepath, weights_only=False):
        os.makedirs(os.path.dirname(filepath) or ".", exist_ok=True)
        temporary = filepath + ".part"
        with open(temporary, "w") as f:
            json.dump({"global_step": self.global_step, "epoch": self.current_epoch,
                       "weights_only": weights_only}, f)
        os.replace(temporary, filepath)
        self.saved.append(filepath)
        self.strategy.barrier("Trainer.save_checkpoint")
