"""Stand-in for Keras 3: Model (whose fit comes from the backend Trainer), callbacks, optimizers."""

from keras import callbacks, optimizers  # noqa: F401
from keras.models import Model  # noqa: F401

__version__ = "3.0.standin"
