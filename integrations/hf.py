"""Scheduled unfreezing in a Hugging Face Trainer: two lines in an existing script (integrations/README.md).

    suf = SUFCallback(layout_for(model, head=["classifier"], others=["bert.pooler"]), suf_k=3)
    trainer = Trainer(..., optimizers=(suf.optimizer(model, args), None), callbacks=[suf])

The callback sets requires_grad before every optimizer step from the Trainer's epoch and global step (stages by
epoch or by step: freeze.Schedule's unfreeze_unit), so a run resumed from a checkpoint in the middle of a stage
freezes what the uninterrupted run froze. It logs each change of the trainable set through the Trainer's logger
and into state.log_history (kept in every checkpoint's trainer_state.json). The optimizer holds every parameter
from the start (integrations/optimizer.py); the Trainer builds its usual LR schedule around it (None above).
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.utils import logging

import freeze
from console import what_trains
from integrations.optimizer import suf_optimizer

logger = logging.get_logger("transformers.trainer")


class SUFCallback(TrainerCallback):
    def __init__(self, layout: freeze.LayerLayout, schedule: freeze.Schedule | None = None, **schedule_kw):
        """schedule None: Schedule("suf", layout.num_layers, **schedule_kw), e.g. suf_k=3, unfreeze_every=1."""
        self.layout = layout
        self.schedule = schedule or freeze.Schedule("suf", layout.num_layers, **schedule_kw)
        self._layers = None  # the trainable layers applied last

    def optimizer(self, model, args, **groups_kw):
        """AdamW over every parameter with args' lr, weight decay, betas and eps (see suf_optimizer)."""
        betas = (args.adam_beta1, args.adam_beta2)
        return suf_optimizer(
            model, self.layout, self.schedule, args.learning_rate, args.weight_decay,
            betas=betas, eps=args.adam_epsilon, **groups_kw,
        )  # fmt: skip

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._layers = None
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._apply(state, model)

    def _apply(self, state, model) -> None:
        # state.epoch is epoch + fraction done (1.0 exactly after the last step of epoch 0); global_step: steps done
        epoch, step = int(state.epoch + 1e-9) if state.epoch else 0, state.global_step
        layers = self.schedule.trainable_layers(epoch, step)
        if layers == self._layers:
            return
        freeze.apply_schedule(model, self.layout, self.schedule, epoch, step)
        self._layers = layers
        what = what_trains.trainable_summary(model, self.layout, self.schedule, epoch, step)
        line = f"epoch {epoch + 1}, step {step}: {what}"
        logger.info(f"scheduled unfreezing: {line}")
        state.log_history.append({"epoch": state.epoch, "step": step, "trainable": line, "trainable_layers": layers})
