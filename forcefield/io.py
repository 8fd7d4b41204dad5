"""Model files: save, load, resolve shipped models by name. Atomic writes everywhere.

Three file kinds:

- *model file* (``torch.save`` of a plain dict, ``format == "oreo-potential"``): config + state dict +
  metadata. Rebuilt with the installed code, so library upgrades do not break loading.
- *TorchScript export* (``torch.jit.save``): loads with ``torch.jit.load`` alone (see ``export.py``).
- *AOTInductor package* (``.pt2``, ``oreo export --format aoti``): compiled forward+backward (see ``compiled.py``).

Training checkpoints (``last.pt`` of a run) load too: their EMA weights are used.
"""
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from . import __version__
from .potential import Potential

MODEL_FORMAT = "oreo-potential"
MODEL_FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


class ModelFileError(RuntimeError):
    """A model file is missing, unreadable or of an unknown kind."""


def atomic_torch_save(obj: Any, path: Union[str, Path], jit: bool = False, **jit_kwargs) -> Path:
    """Write with torch.save (or torch.jit.save) to a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if jit:
            torch.jit.save(obj, tmp, **jit_kwargs)
        else:
            torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def model_record(model: Potential) -> Dict[str, Any]:
    return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "oreo_version": __version__,
            "config": model.config, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_model(model: Potential, path: Union[str, Path]) -> Path:
    """Save config + weights + metadata (not the pickled module)."""
    return atomic_torch_save(model_record(model), path)


def shipped_models() -> Dict[str, Path]:
    """Name -> path of the models shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(PRETRAINED_DIR.glob("*.pt"))}


def resolve_model_path(model: Union[str, Path]) -> Path:
    """A path, or the bare name of a shipped model ("aspirin" or "aspirin.pt")."""
    p = Path(model).expanduser()
    if p.is_file():
        return p
    name = p.name[:-3] if p.name.endswith(".pt") else p.name
    shipped = shipped_models()
    if len(p.parts) == 1 and name in shipped:
        return shipped[name]
    avail = ", ".join(shipped) or "none installed"
    raise ModelFileError(f"model file '{model}' not found (looked at {p.resolve()} and among the shipped models: "
                         f"{avail}). Pass a path to a file written by `oreo train`/`oreo export`, or a shipped name.")


def is_torchscript_file(path: Union[str, Path]) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, IndexError):
        return False


def _read_record(path: Path) -> Dict[str, Any]:
    try:
        rec = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt, truncated, not a torch file
        raise ModelFileError(f"cannot read model file {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
                             f"not an oreo model; re-download it or re-export it with `oreo export`.") from None
    if not isinstance(rec, dict):
        raise ModelFileError(f"{path} is not an oreo model file (it holds a {type(rec).__name__})")
    if rec.get("format") == "oreo-checkpoint":  # training checkpoint: use its EMA weights
        rec = rec["model"]
    if rec.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not an oreo model file (format={rec.get('format')!r})")
    if rec.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer oreo (format version {rec['format_version']}); "
                             f"upgrade oreo to load it")
    return rec


def load_potential(model: Union[str, Path], device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = torch.float32):
    """Load a model file, a training checkpoint, or a TorchScript export, ready for inference (eval mode).

    Returns a :class:`Potential` (or a scripted module with the same call signature and the attributes
    ``cutoff`` and ``metadata_json``).
    """
    path = resolve_model_path(model)
    from .compiled import is_compiled_file, load_compiled
    if is_compiled_file(path):  # AOTInductor .pt2: dtype and device fixed at export
        return load_compiled(path)
    if is_torchscript_file(path):
        try:
            mod = torch.jit.load(str(path), map_location=device)
        except Exception as exc:
            raise ModelFileError(f"cannot load TorchScript file {path}: {exc}") from None
    else:
        rec = _read_record(path)
        mod = Potential.from_config(rec["config"], rec["state_dict"])
    return cast_potential(mod, device, dtype).eval()


def load_trainable_potential(model: Union[str, Path]) -> Potential:
    """An oreo model file or training checkpoint as a float32 :class:`Potential` whose weights can be trained
    further (exports are frozen: they cannot)."""
    path = resolve_model_path(model)
    from .compiled import is_compiled_file
    if is_compiled_file(path) or is_torchscript_file(path):
        raise ModelFileError(f"{path} is an export (TorchScript or AOTInductor) and cannot be trained further; "
                             f"start from the oreo model file it was exported from")
    rec = _read_record(path)
    pot = Potential.from_config(rec["config"], rec["state_dict"])
    pot.set_metadata(name=path.stem)
    return cast_potential(pot, "cpu", torch.float32).train()


def cast_potential(mod, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
    """Move/cast a potential; the reference energies stay float64 (total energies are large)."""
    ref = mod.atomref.detach().clone()
    mod = mod.to(device=device, dtype=dtype) if dtype is not None else mod.to(device=device)
    mod.atomref.data = ref.to(device=device, dtype=torch.float64)
    return mod
