"""Optimiser, learning-rate schedule and exponential moving average of the weights."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from molden.train.config import OptimConfig


def build_optimizer(parameters, config: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW with the config's betas and weight decay."""
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(list(parameters), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based).

    Linear warm-up over `warmup_steps` from `warmup_start_fraction` (Noisy Nodes App. Tables
    9-10: "start learning rate"), then one of: cosine decay to `final_lr_fraction` at
    `cosine_cycle_steps` (the run's steps by default; warm-up included, as optax's
    `warmup_cosine_decay_schedule`, and flat after it), constant, or multistep (× `lr_gamma` at
    each of `lr_milestones`: ForceNet App. D, "halved every 50K" after 250K constant)."""
    if config.warmup_steps and step < config.warmup_steps:
        start = config.warmup_start_fraction
        return start + (1 - start) * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "multistep":
        return config.lr_gamma ** bisect.bisect_right(config.lr_milestones, step)
    end = config.cosine_cycle_steps or total_steps
    span = max(1, end - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))


class EMA:
    """Exponential moving average of a model's parameters and buffers, updated after each
    optimiser step with decay min(decay, (1 + t) / (10 + t)) (Noisy Nodes App., as
    TensorFlow's `ExponentialMovingAverage` with num_updates), t the number of updates so far.

    Floating-point buffers are averaged too; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach(), 1 - d)
            else:
                shadow.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        """The counters; the averaged weights themselves are `weights()` (a checkpoint stores
        them once, as the inference weights)."""
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict, weights: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for name, value in weights.items():
            self.shadow[name].copy_(value)

    def weights(self) -> dict:
        """The averaged state dict (load it into a copy of the model to evaluate)."""
        return self.shadow
