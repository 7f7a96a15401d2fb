"""Stand-in backend Trainer: ``fit`` with the loop of Keras 3's trainers (TensorFlow, JAX and torch
alike): on_train_batch_end, then ``stop_training`` checked, out of the epoch, then out of the epoch
loop after on_epoch_end; on_train_end; the History returned."""

from keras.callbacks import CallbackList


class Trainer:
    def __init__(self):
        self.stop_training = False
        self.optimizer = None
        self.history = None

    def compile(self, optimizer=None, loss=None):
        self.optimizer = optimizer

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, class_weight=None, sample_weight=None,
            initial_epoch=0, steps_per_epoch=None):
        if not isinstance(callbacks, CallbackList):
            callbacks = CallbackList(callbacks, add_history=True, model=self, epochs=epochs,
                                     steps=steps_per_epoch, verbose=verbose)
        self.stop_training = False
        callbacks.on_train_begin()
        training_logs = None
        logs = {}
        for epoch in range(initial_epoch, epochs):
            callbacks.on_epoch_begin(epoch)
            for step in range(steps_per_epoch):
                callbacks.on_train_batch_begin(step)
                logs = self.train_step(step)
                callbacks.on_train_batch_end(step, logs)
                if self.stop_training:
                    break
            epoch_logs = dict(logs)
            callbacks.on_epoch_end(epoch, epoch_logs)
            training_logs = epoch_logs
            if self.stop_training:
                break
        callbacks.on_train_end(logs=training_logs)
        return self.history

    def train_step(self, step):
        self.optimizer.apply()
        return {"loss": 1.0 / int(self.optimizer.iterations)}
