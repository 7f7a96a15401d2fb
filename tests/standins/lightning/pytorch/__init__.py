"""Stand-in for ``lightning.pytorch``: Trainer, LightningModule, Callback and ModelCheckpoint."""

from lightning.pytorch.callbacks import Callback  # noqa: F401
from lightning.pytorch.core import LightningModule  # noqa: F401
from lightning.pytorch.trainer import Trainer  # noqa: F401
