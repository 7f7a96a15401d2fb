"""Stand-in LightningModule: training_step returns a dict with the loss, like most real ones."""


class LightningModule:
    def training_step(self, batch, batch_idx):
        return {"loss": 1.0 / (1 + batch)}
