"""Pieces of the epoch loop shared by training, fine-tuning and pretraining."""
import csv
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
                   grad_clip: float, step: int, checkpoint: Path, what: str = "training", detail: str = "") -> None:
    """Check the loss is finite (else a clear error naming the checkpoint to resume from), backpropagate,
    clip the gradient norm (``grad_clip`` > 0) and step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} loss became {loss.item()} at step {step}{detail}; lower optim.lr or "
                                 f"optim.grad_clip and resume from {checkpoint}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


def early_stop_reason(epochs_since_best: int, patience: int, lr: float, lr_min: float, step: int,
                      warmup_steps: int, elapsed_s: float, max_minutes: Optional[float]) -> str:
    """Why an epoch loop should stop now ("" to go on): no improvement, learning rate at its floor, time budget."""
    if epochs_since_best >= patience:
        return f"early stop: no improvement for {patience} epochs"
    if lr <= lr_min * 1.0001 and step > warmup_steps:
        return f"learning rate reached its minimum {lr_min:g}"
    if max_minutes is not None and elapsed_s > 60 * max_minutes:
        return f"time budget of {max_minutes:g} min reached (continue with --resume)"
    return ""


def append_csv(path: Path, row: Dict, fieldnames: Sequence[str]) -> None:
    """Append one row, writing the header when the file is new."""
    new = not Path(path).exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fieldnames))
        if new:
            w.writeheader()
        w.writerow(row)
