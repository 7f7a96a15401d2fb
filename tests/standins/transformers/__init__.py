"""Stand-in for Hugging Face transformers: Trainer, TrainingArguments and the callback classes.

Like the real package, the top level imports its submodules lazily, on first attribute
access, so ``from transformers import Trainer`` is what imports ``transformers.trainer``.
"""

import importlib

__version__ = "0.0.standin"

_WHERE = {
    "Trainer": "trainer",
    "TrainingArguments": "training_args",
    "TrainerCallback": "trainer_callback",
    "TrainerControl": "trainer_callback",
    "TrainerState": "trainer_callback",
    "DefaultFlowCallback": "trainer_callback",
}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module("." + _WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
