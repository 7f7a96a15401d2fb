"""stopstep's framework integrations, loaded by ``_stopstep_inprocess`` when a framework is imported.

Each ``attach_*`` function gets the framework's module right after it was executed and
makes every training of that framework carry a callback that reports each finished
step to this process's :class:`_stopstep_inprocess.Client` and stops the training, the
framework's own way, after the step the client says to stop after. Standard library
only, Python 3.9 to 3.13. Everything a framework calls goes through
``_stopstep_inprocess.guarded``: an error disengages the in-process side with one line
on stderr instead of reaching the training code.
"""

import os

from _stopstep_inprocess import client, guarded, host_number


def _patch_init(cls, after_init):
    """Make ``cls.__init__`` call ``after_init(instance)`` once the original is done."""
    import functools

    original = cls.__init__
    if getattr(original, "_stopstep_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        guarded(cls.__module__, after_init, self)

    __init__._stopstep_patched = True
    cls.__init__ = __init__


# -- Hugging Face Transformers --------------------------------------------------

def attach_transformers(module):
    base = getattr(module, "TrainerCallback", None)
    if base is None:
        from transformers.trainer_callback import TrainerCallback as base  # noqa: N813

    class StopstepTrainerCallback(base):
        """stopstep: stop (and save) at the stop step; report every step with what it logged."""

        def __init__(self):
            self._logged = None  # values logged outside a step's own log (evaluation): sent with the next step
            self._deferred = None  # (step, values) whose report waits for the step's on_log

        def on_train_begin(self, args, state, control, **kwargs):
            guarded("transformers", client().begin, "hf", state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            return guarded("transformers", self._step_end, state, control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            guarded("transformers", self._log, logs)

        def on_train_end(self, args, state, control, **kwargs):
            guarded("transformers", self._flush)

        def _step_end(self, state, control):
            self._flush()
            values, self._logged = self._logged, None
            # DefaultFlowCallback, before us, set should_log when this step logs: its
            # loss comes in on_log right after, so the step's report waits for it.
            defer = bool(control.should_log)
            current = client()
            if current.step_end("hf", state.global_step, values, report=not defer):
                control.should_training_stop = True
                if current.saves_at_stop():
                    control.should_save = True
            if defer:
                self._deferred = (state.global_step, values)
            return control

        def _log(self, logs):
            if self._deferred is not None:
                (step, values), self._deferred = self._deferred, None
                merged = dict(values or {})
                merged.update(logs or {})
                client().report("hf", step, merged)
            elif logs:
                self._logged = dict(logs)

        def _flush(self):
            if self._deferred is not None:  # its on_log never came
                (step, values), self._deferred = self._deferred, None
                client().report("hf", step, values)

    def add_callback(trainer):
        trainer.add_callback(StopstepTrainerCallback())

    _patch_init(module.Trainer, add_callback)


# -- Lightning ----------------------------------------------------------------

def attach_lightning(module):
    namespace = module.__name__  # lightning.pytorch or pytorch_lightning
    Callback = module.Callback

    class StopstepLightningCallback(Callback):
        """stopstep: stop at the stop step, and make sure each ModelCheckpoint of the run has
        a checkpoint at that step, written by its own machinery while the epoch is still open.

        ModelCheckpoint runs after every other callback (Lightning keeps it last, and calls
        it after the LightningModule's own epoch-end hook), and may save the stop step by
        itself: at this batch end (``every_n_train_steps``), at the validation that the stop
        brings on, or at the end of the epoch the stop ends. So the check comes right after
        its ``on_train_epoch_end`` (wrapped on the instance from the stop's batch end to
        ``on_train_end``), where the loop still says "in the epoch, this batch done", as in
        ModelCheckpoint's own saves:
        a checkpoint written later, in ``on_train_end``, has the epoch counted as finished
        and a resumed run would skip the rest of it *and* the same number of batches of the
        next. ``on_train_end`` only catches a stop whose epoch end never came.
        """

        def __init__(self):
            self._last_step = None
            self._stop_step = None  # the step training stops after, when it gets a checkpoint
            self._wrapped = []  # (ModelCheckpoint, its own instance attribute) wrapped for the stop
            self._unchecked = {}  # id -> (ModelCheckpoint, its candidates at the stop's batch end)

        def on_train_start(self, trainer, pl_module):
            guarded(namespace, self._start, trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
            guarded(namespace, self._batch_end, trainer, outputs)

        def on_train_end(self, trainer, pl_module):
            try:
                guarded(namespace, self._checkpoint_unchecked, trainer)
            finally:
                self._unwrap()

        def on_exception(self, trainer, pl_module, exception):
            self._unwrap()

        def _start(self, trainer):
            self._last_step = trainer.global_step  # the step it starts at is not a finished step
            self._stop_step = None
            self._unchecked = {}
            client().begin("lightning", self._last_step)

        def _batch_end(self, trainer, outputs):
            step = trainer.global_step
            if step == self._last_step:
                return  # accumulating gradients: no optimizer step finished with this batch
            self._last_step = step
            current = client()
            if current.step_end("lightning", step, _lightning_values(outputs)):
                trainer.should_stop = True  # again at each later step, while min_steps holds it back
                if current.saves_at_stop():
                    self._stop_step = step
                    self._plan_checkpoints(trainer)

        def _plan_checkpoints(self, trainer):
            self._unchecked = {}
            for callback in trainer.callbacks:
                if _writes_checkpoints(callback):
                    # the names of this batch end, for the late save at on_train_end only
                    self._unchecked[id(callback)] = (callback, _monitor_candidates(callback, trainer))
                    if not any(callback is c for c, _ in self._wrapped):
                        self._wrap(callback)

        def _wrap(self, callback):
            own = callback.__dict__.get("on_train_epoch_end")  # an instance attribute, kept as it was
            original = callback.on_train_epoch_end

            def on_train_epoch_end(trainer, pl_module, *args, **kwargs):
                original(trainer, pl_module, *args, **kwargs)  # its own errors are Lightning's business
                guarded(namespace, self._check_after_epoch_end, trainer, callback)

            callback.on_train_epoch_end = on_train_epoch_end
            self._wrapped.append((callback, own))

        def _unwrap(self):
            wrapped, self._wrapped = self._wrapped, []
            for callback, own in wrapped:
                try:
                    if own is None:
                        del callback.on_train_epoch_end
                    else:
                        callback.on_train_epoch_end = own
                except Exception:
                    pass

        def _check_after_epoch_end(self, trainer, callback):
            step = self._stop_step
            if step is None or trainer.global_step != step or not trainer.should_stop:
                return  # not the stop's epoch end
            if not getattr(getattr(trainer, "fit_loop", None), "_can_stop_early", True):
                return  # min_epochs / min_steps: Lightning goes on; the stop comes later
            self._unchecked.pop(id(callback), None)
            _checkpoint_now(trainer, callback, step, _monitor_candidates(callback, trainer))

        def _checkpoint_unchecked(self, trainer):
            """The stop's epoch end never came (not in the Lightning versions seen): save now."""
            step = self._stop_step
            unchecked, self._unchecked = self._unchecked, {}
            if step is None or trainer.global_step != step:
                return
            for callback, candidates in unchecked.values():
                _checkpoint_now(trainer, callback, step, candidates)

    def add_callback(trainer):
        callbacks = trainer.callbacks
        # Lightning keeps checkpoint callbacks last; go just before them, like a user's callback.
        position = len(callbacks)
        for index, callback in enumerate(callbacks):
            if _is_checkpoint_callback(callback):
                position = index
                break
        callbacks.insert(position, StopstepLightningCallback())

    _patch_init(module.Trainer, add_callback)


def _checkpoint_now(trainer, callback, step, candidates):
    """Give ``callback`` (a ModelCheckpoint) a checkpoint at ``step`` unless it has one, the
    way it saves its own: its top-k bookkeeping (the one it replaces is removed with
    ``save_top_k=1``), its naming, and its ``last.ckpt`` (``save_last``), so that
    ``best_model_path``, ``last_model_path`` and ``fit(ckpt_path="last")`` all mean the
    stop step. A file of that name already there (an earlier run's) is left alone.

    Every rank decides alike (the same step and ModelCheckpoint state, and rank 0's answer
    to ``file_exists``) and every rank saves, as DDP needs (rank 0 writes)."""
    if getattr(callback, "_last_global_step_saved", None) == step:
        return  # it saved this step itself
    weights_only = getattr(callback, "save_weights_only", False)
    if getattr(callback, "save_top_k", 1) != 0:
        path = callback.format_checkpoint_name(candidates)
        exists = getattr(callback, "file_exists", None)
        if not (exists(path, trainer) if exists is not None else os.path.exists(path)):
            monitor = getattr(callback, "monitor", None)
            save_topk = getattr(callback, "_save_topk_checkpoint", None)
            save_one = getattr(callback, "_save_checkpoint", None)
            if save_topk is not None and (monitor is None or monitor in candidates):
                save_topk(trainer, candidates)  # a monitored one keeps it only if it is among the best
            if getattr(callback, "_last_global_step_saved", None) != step:
                # not among the best k (or an unknown ModelCheckpoint): saved as Lightning saves
                # on an exception, in its naming and outside its top k
                if save_one is not None:
                    save_one(trainer, path)
                else:
                    trainer.save_checkpoint(path, weights_only)
    if getattr(callback, "save_last", None):
        save_last = getattr(callback, "_save_last_checkpoint", None)
        if save_last is not None:
            save_last(trainer, candidates)


def _is_checkpoint_callback(callback):
    return callable(getattr(callback, "format_checkpoint_name", None))


def _writes_checkpoints(callback):
    """A ModelCheckpoint that saves somewhere: top-k checkpoints or ``last.ckpt`` (its dirpath is set in setup)."""
    return (_is_checkpoint_callback(callback)
            and getattr(callback, "dirpath", None) is not None
            and (getattr(callback, "save_top_k", 1) != 0 or bool(getattr(callback, "save_last", None))))


def _monitor_candidates(callback, trainer):
    candidates = getattr(callback, "_monitor_candidates", None)
    if candidates is not None:
        return candidates(trainer)
    metrics = dict(getattr(trainer, "callback_metrics", None) or {})
    metrics.setdefault("epoch", trainer.current_epoch)
    metrics.setdefault("step", trainer.global_step)
    return metrics


def _lightning_values(outputs):
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None:
        return None
    number = host_number(loss)
    return None if number is None else {"loss": number}


# -- Keras --------------------------------------------------------------------

_KERAS_FIT_CALLBACKS_POSITION = 5  # fit(x, y, batch_size, epochs, verbose, callbacks, ...), Keras 2 and 3


def attach_keras(module):
    import functools

    Callback = module.callbacks.Callback
    Model = module.Model

    class StopstepKerasCallback(Callback):
        """stopstep: stop at the batch end where optimizer.iterations reaches the stop step."""

        def on_train_begin(self, logs=None):
            guarded("keras", self._begin)

        def on_train_batch_end(self, batch, logs=None):
            guarded("keras", self._batch_end, logs)

        def _begin(self):
            try:
                start = int(self.model.optimizer.iterations)
            except Exception:  # not built yet in some versions: the start step is optional
                start = None
            client().begin("keras", start)

        def _batch_end(self, logs):
            model = self.model  # one access: with JAX it syncs the model's state
            if client().step_end("keras", int(model.optimizer.iterations), logs):
                model.stop_training = True

    original = Model.fit
    if getattr(original, "_stopstep_patched", False):
        return

    @functools.wraps(original)
    def fit(self, *args, **kwargs):
        added = guarded("keras", _with_callback, self, args, kwargs, StopstepKerasCallback)
        if added is not None:
            args, kwargs = added
        return original(self, *args, **kwargs)

    fit._stopstep_patched = True
    Model.fit = fit


def _with_callback(model, args, kwargs, callback_class):
    """fit's arguments with one of our callbacks added to ``callbacks``, wherever it was passed."""
    positional = len(args) > _KERAS_FIT_CALLBACKS_POSITION
    callbacks = args[_KERAS_FIT_CALLBACKS_POSITION] if positional else kwargs.get("callbacks")
    if callbacks is None:
        callbacks = [callback_class()]
    elif isinstance(callbacks, (list, tuple)):
        if any(isinstance(c, callback_class) for c in callbacks):
            return args, kwargs
        callbacks = list(callbacks) + [callback_class()]
    elif isinstance(getattr(callbacks, "callbacks", None), list):  # a CallbackList, used as it is
        if not any(isinstance(c, callback_class) for c in callbacks.callbacks):
            ours = callback_class()
            ours.set_model(model)
            callbacks.callbacks.append(ours)
        return args, kwargs
    else:
        return args, kwargs
    if positional:
        args = args[:_KERAS_FIT_CALLBACKS_POSITION] + (callbacks,) + args[_KERAS_FIT_CALLBACKS_POSITION + 1:]
    else:
        kwargs = dict(kwargs, callbacks=callbacks)
    return args, kwargs
