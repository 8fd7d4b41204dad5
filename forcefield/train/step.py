"""One optimiser step, shared by training, fine-tuning and pretraining."""
from pathlib import Path
from typing import Iterable

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
