"""Stand-in Trainer with the real inner loop's order: global_step += 1, on_step_end,
then log / save (checkpoint-N, trainer_state.json last) as control says, then break
out of both loops on should_training_stop, on_train_end, and return normally."""

import json
import os
from collections import namedtuple

from .trainer_callback import (  # noqa: F401
    CallbackHandler,
    DefaultFlowCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

TrainOutput = namedtuple("TrainOutput", ["global_step", "training_loss", "metrics"])


class Trainer:
    def __init__(self, model=None, args=None, callbacks=None):
        self.model = model
        self.args = args
        self.callback_handler = CallbackHandler([DefaultFlowCallback] + list(callbacks or []))
        self.state = TrainerState()
        self.control = TrainerControl()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    def add_callback(self, callback):
        self.callback_handler.add_callback(callback)

    def train(self, resume_from_checkpoint=None):
        args = self.args
        self.state = TrainerState(max_steps=args.max_steps, logging_steps=args.logging_steps,
                                  save_steps=args.save_steps)
        if resume_from_checkpoint:
            self.state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            self.state.max_steps = args.max_steps
        steps_trained = self.state.global_step
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        loss = 0.0
        for epoch in range(args.num_train_epochs):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            for step in range(args.steps_per_epoch):
                if steps_trained > 0:  # skipping the batches of a resumed epoch
                    steps_trained -= 1
                    continue
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                loss = self.training_step(self.state.global_step)
                self.state.global_step += 1
                self.state.epoch = epoch + (step + 1) / args.steps_per_epoch
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                self._maybe_log_save_evaluate(loss)
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return TrainOutput(self.state.global_step, loss, {})

    def training_step(self, step):
        return 1.0 / (1 + step) if self.model is None else self.model(step)

    def _maybe_log_save_evaluate(self, loss):
        # As the real Trainer: with logging_nan_inf_filter (its default) a NaN or inf loss is
        # replaced by the mean of the losses so far; grad_norm, from the gradients, stays NaN.
        finite = loss == loss and abs(loss) != float("inf")
        if finite:
            self._losses = getattr(self, "_losses", []) + [loss]
        if self.control.should_log:
            shown = loss
            if not finite and self.args.logging_nan_inf_filter:
                seen = getattr(self, "_losses", []) or [0.0]
                shown = sum(seen) / len(seen)
            self.log({"loss": shown, "grad_norm": loss * 10, "learning_rate": 0.001})
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def log(self, logs):
        logs = dict(logs, epoch=self.state.epoch)
        self.state.log_history.append(dict(logs, step=self.state.global_step))
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def _save_checkpoint(self):
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "w") as f:
            json.dump({"weights": self.state.global_step}, f)
        self.state.save_to_json(os.path.join(path, "trainer_state.json"))  # last, as the real one
