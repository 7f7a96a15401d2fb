"""Stand-in keras.Model: fit is inherited from the backend Trainer, as in Keras 3."""

from keras.trainer import Trainer


class Model(Trainer):
    pass
