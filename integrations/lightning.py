"""Scheduled unfreezing in a Lightning Trainer, built on Lightning's BaseFinetuning (integrations/README.md):

    suf = SUFFinetuning(layout_for(self, head=["model.classifier"], others=["model.bert.pooler"]), suf_k=3)
    Trainer(..., callbacks=[suf]);   in configure_optimizers: return suf.optimizer(self, lr=2e-5, weight_decay=0.01)

BaseFinetuning freezes before configure_optimizers (freeze_before_training: stage 0) and calls finetune_function
at every epoch start (later stages); with stages in optimizer steps the schedule is applied before every batch.
Unlike BaseFinetuning's own recipe nothing is added to the optimizer later: it holds every parameter from the
start (integrations/optimizer.py), so LR schedulers and optimizer checkpoints keep their groups.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities import rank_zero_info

import freeze
from console import what_trains
from integrations.optimizer import suf_optimizer


class SUFFinetuning(BaseFinetuning):
    def __init__(self, layout: freeze.LayerLayout, schedule: freeze.Schedule | None = None, **schedule_kw):
        """schedule None: Schedule("suf", layout.num_layers, **schedule_kw), e.g. suf_k=3, unfreeze_every=1."""
        super().__init__()
        self.layout = layout
        self.schedule = schedule or freeze.Schedule("suf", layout.num_layers, **schedule_kw)
        self.history: list[dict] = []  # one entry per change of the trainable set (the first: stage 0)

    def optimizer(self, pl_module, lr: float, weight_decay: float = 0.0, **kw):
        """AdamW over every parameter (see suf_optimizer); return it from configure_optimizers."""
        return suf_optimizer(pl_module, self.layout, self.schedule, lr, weight_decay, **kw)

    def freeze_before_training(self, pl_module) -> None:
        self._apply(pl_module, 0, 0)

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        self._apply(pl_module, epoch, pl_module.trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.schedule.unfreeze_unit == "step":
            self._apply(pl_module, trainer.current_epoch, trainer.global_step)

    def _apply(self, pl_module, epoch: int, step: int) -> None:
        layers = self.schedule.trainable_layers(epoch, step)
        if self.history and self.history[-1]["trainable_layers"] == layers:
            return
        freeze.apply_schedule(pl_module, self.layout, self.schedule, epoch, step)
        self.history.append({"epoch": epoch, "step": step, "trainable_layers": layers})
        what = what_trains.trainable_summary(pl_module, self.layout, self.schedule, epoch, step)
        rank_zero_info(f"scheduled unfreezing: epoch {epoch + 1}, step {step}: {what}")
