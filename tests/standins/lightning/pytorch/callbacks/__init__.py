"""Stand-in ``lightning.pytorch.callbacks``."""

from lightning.pytorch.callbacks.callback import Callback, Checkpoint  # noqa: F401
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint  # noqa: F401
