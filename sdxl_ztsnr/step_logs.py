"""The training loop's running numbers: loss and non-finite steps summed on the device (no host sync per step),
read and logged every --logging_steps, and the stop after too many bad steps in a row."""

from __future__ import annotations

import time

import torch


class StepLogs:
    """Per-window loss (mean over micro-batches and processes), learning rate, samples/s, skipped steps."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.bad_in_a_row = torch.zeros((), device=device)  # non-finite updates in a row (0 after a good one)
        self.bad_total = torch.zeros((), device=device)
        self.micro_batches, self.started = 0, time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        self.loss += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0)
        self.micro_batches += 1

    def add_update(self, found_inf: torch.Tensor) -> None:
        """After an optimizer update; ``found_inf`` is 1.0 where the step was skipped as non-finite."""
        self.bad_in_a_row = (self.bad_in_a_row + found_inf) * found_inf
        self.bad_total += found_inf

    def flush(self, accelerator, global_batch_size: int, lr: float) -> dict[str, float]:
        """The window's numbers (one host sync), then a new window."""
        elapsed = time.perf_counter() - self.started
        logs = {
            "loss": accelerator.reduce(self.loss, "mean").item() / self.micro_batches,
            "lr": lr,
            "samples_per_s": self.micro_batches * global_batch_size / elapsed,
            "skipped_steps": self.bad_total.item(),
        }
        self.loss.zero_()
        self.micro_batches, self.started = 0, time.perf_counter()
        return logs

    def bad_steps_in_a_row(self) -> int:
        return int(self.bad_in_a_row.item())
