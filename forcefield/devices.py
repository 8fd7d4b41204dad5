"""Which torch device a command runs on: one check for every entry point (training, pretraining, MD, the ASE
calculator, evaluation), so that asking for a GPU that is not there is an error that says so, not a traceback
from deep inside torch."""
import torch

__all__ = ["resolve_device"]


def resolve_device(name, option: str = "optim.device") -> torch.device:
    """``auto`` is the GPU when torch sees one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` (or a
    :class:`torch.device`) as torch names them. ``option``: how the user set it, for the error message."""
    if isinstance(name, torch.device):
        device = name
    elif name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{option} must be auto, cpu, cuda or cuda:N, got '{name}'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} is '{name}' but torch sees no GPU (torch {torch.__version__}); "
                             f"set it to cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} is '{name}' but torch sees {torch.cuda.device_count()} GPU(s)")
    return device
