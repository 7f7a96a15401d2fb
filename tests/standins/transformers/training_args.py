"""Stand-in TrainingArguments: only the fields the training loop reads."""

from dataclasses import dataclass


@dataclass
class TrainingArguments:
    output_dir: str
    max_steps: int = 10
    num_train_epochs: int = 1000
    logging_steps: int = 500
    save_steps: int = 500
    steps_per_epoch: int = 4  # stands in for len(train_dataloader)
    logging_nan_inf_filter: bool = True  # as the real one: a NaN or inf loss is logged as the mean so far
