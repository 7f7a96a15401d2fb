"""Stand-in for the ``lightning`` package: its top level imports ``lightning.pytorch``, as the real one does."""

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: F401

__version__ = "0.0.standin"
