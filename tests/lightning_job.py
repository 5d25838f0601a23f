"""A tiny Lightning job for tests/test_integrations_lightning.py: trains, checkpoints each
epoch through ckpt's CheckpointIO, optionally SIGKILLs itself at the start of an epoch."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckpt.integrations.lightning import CkptCheckpointIO


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05, run: argparse.Namespace | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 8, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


class KillAtEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.strategy.checkpoint_io.teardown()  # the previous epoch's save has committed
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(dirpath: str, epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        plugins=[CkptCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=dirpath, every_n_epochs=1, save_top_k=-1), *callbacks],
    )


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dirpath")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--kill-at-epoch", type=int)
    p.add_argument("--resume")
    p.add_argument("--losses")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Regressor(run=argparse.Namespace(name="job", tags=("a", "b")))
    callbacks = [KillAtEpoch(args.kill_at_epoch)] if args.kill_at_epoch is not None else []
    t = trainer(args.dirpath, args.epochs, callbacks)
    t.fit(model, ckpt_path=args.resume)
    t.strategy.checkpoint_io.teardown()
    if args.losses:
        with open(args.losses, "w") as f:
            json.dump(model.losses, f)


if __name__ == "__main__":
    main(sys.argv[1:])
