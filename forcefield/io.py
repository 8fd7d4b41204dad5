"""Model files: the one module that reads and writes them, with one dispatch over every format.

:func:`open_model_file` tells every kind apart (and gives errors that name the fix); every loader goes through
it: :func:`load_potential` (inference), :func:`load_trainable_potential` (continue training or fine-tune),
:func:`load_model` (any kind, e.g. a QM9 property model).

Record files (``torch.save`` of a plain dict with a ``"format"``), rebuilt with the installed code, so library
upgrades do not break loading:

- ``oreo-potential``: a model file (config + state dict + metadata), written by :func:`save_model`;
  ``pretrained.pt`` of a pretraining run is one, with the pretraining record under ``"pretrain"``;
- ``oreo-property-model``: a QM9 property model (:mod:`forcefield.pretrain.property` registers it);
- ``oreo-committee``: several model records in one file, loaded as one potential that gives the committee mean
  and spread (:mod:`forcefield.committee` registers it; not trainable as one model);
- checkpoints that wrap one of these (:data:`WRAPPERS`): ``oreo-checkpoint`` (training: its EMA model),
  ``oreo-runstate`` (the compact run state of ``oreo train --state``), ``oreo-pretrain-checkpoint`` and
  ``oreo-property-checkpoint``.

Exports (frozen, inference only):

- TorchScript (``oreo export``): loads with ``torch.jit.load`` alone (see ``export.py``);
- AOTInductor package ``.pt2`` (``oreo export --format aoti``; :mod:`forcefield.compiled` registers it).

Formats defined above this module register themselves (:func:`register_record_format`,
:func:`register_file_format`); io imports nothing of theirs, it only loads :data:`FORMAT_PLUGINS` by name before
its first dispatch, so a ``.pt2`` loads without its caller importing :mod:`forcefield.compiled`.
"""
import importlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .version import __version__
from .files import atomic_torch_save
from .potential import Potential

MODEL_FORMAT = "oreo-potential"
MODEL_FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
#: checkpoint formats that hold a model record, and the key it is under
WRAPPERS = {"oreo-checkpoint": "model", "oreo-runstate": "model", "oreo-pretrain-checkpoint": "potential",
            "oreo-property-checkpoint": "model"}
#: modules that register formats (imported by name before the first dispatch)
FORMAT_PLUGINS = ("forcefield.compiled", "forcefield.pretrain.property", "forcefield.committee")

ModelLike = Union[str, Path]


class ModelFileError(RuntimeError):
    """A model file is missing, unreadable or of an unknown kind."""


class ModelFileNotFound(ModelFileError, FileNotFoundError):
    """No model file (nor shipped model) of that name."""


# ---------------------------------------------------------------------------- formats
@dataclass
class RecordFormat:
    """A kind of record file: ``build(record)`` rebuilds the module (CPU, not cast)."""
    name: str
    version: int
    build: Callable[[Dict[str, Any]], nn.Module]
    potential: bool          # computes energies and forces (usable by the calculator, MD, export)
    not_trainable: Optional[str] = None   # set: its modules cannot be trained further; says what to start from


@dataclass
class FileFormat:
    """A kind of export: ``sniff(path)`` returns its header (a dict) when the file is of this kind, else None;
    ``load(path, header, device, dtype)`` returns the module, ready for inference."""
    name: str
    sniff: Callable[[Path], Optional[Dict[str, Any]]]
    load: Callable[[Path, Dict[str, Any], Any, Optional[torch.dtype]], nn.Module]


def _is_torchscript(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with zipfile.ZipFile(path) as zf:
            return {} if any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist()) else None
    except (zipfile.BadZipFile, OSError, IndexError):
        return None


def _load_torchscript(path: Path, header: Dict[str, Any], device, dtype) -> nn.Module:
    """A TorchScript export on ``device``, in the dtype it was exported in (``dtype`` is not applied: a float64
    export asked for by its maker stays float64, as an AOTInductor package does)."""
    try:
        mod = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelFileError(f"cannot load TorchScript file {path}: {exc}") from None
    return cast_potential(mod, device, None)


_RECORD_FORMATS: Dict[str, RecordFormat] = {
    MODEL_FORMAT: RecordFormat(MODEL_FORMAT, MODEL_FORMAT_VERSION,
                               lambda rec: Potential.from_config(rec["config"], rec["state_dict"]), potential=True)}
_FILE_FORMATS: List[FileFormat] = [FileFormat("torchscript", _is_torchscript, _load_torchscript)]
_plugins_loaded = False


def register_record_format(fmt: RecordFormat) -> None:
    _RECORD_FORMATS[fmt.name] = fmt


def register_file_format(fmt: FileFormat) -> None:
    """Checked before the formats already known (a more specific zip layout than TorchScript's)."""
    _FILE_FORMATS[:] = [fmt] + [f for f in _FILE_FORMATS if f.name != fmt.name]


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for name in FORMAT_PLUGINS:
            importlib.import_module(name)


# ---------------------------------------------------------------------------- writing
def model_record(model: Potential) -> Dict[str, Any]:
    return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "oreo_version": __version__,
            "config": model.config, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_model(model: Potential, path: Union[str, Path]) -> Path:
    """Save config + weights + metadata (not the pickled module)."""
    return atomic_torch_save(model_record(model), path)


# ---------------------------------------------------------------------------- finding
def shipped_models() -> Dict[str, Path]:
    """Name -> path of the models shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(PRETRAINED_DIR.glob("*.pt"))}


def resolve_model_path(model: ModelLike) -> Path:
    """A path, or the bare name of a shipped model ("aspirin" or "aspirin.pt")."""
    p = Path(model).expanduser()
    if p.is_file():
        return p
    name = p.name[:-3] if p.name.endswith(".pt") else p.name
    shipped = shipped_models()
    if len(p.parts) == 1 and name in shipped:
        return shipped[name]
    avail = ", ".join(shipped) or "none installed"
    raise ModelFileNotFound(f"model file '{model}' not found (looked at {p.resolve()} and among the shipped models: "
                            f"{avail}). Pass a path to a file written by `oreo train`/`oreo export`/`oreo pretrain`, "
                            f"or a shipped name (`oreo models` lists them).")


# ---------------------------------------------------------------------------- the dispatch
@dataclass
class ModelFile:
    """One model file, recognised: ``kind`` is a record format (``oreo-potential``, ``oreo-property-model``) or
    an export (``torchscript``, ``oreo-aoti``); ``wrapper`` the checkpoint format it came in (or None);
    ``record`` the model record (None for exports); ``header`` what an export's file says about itself."""
    path: Path
    kind: str
    wrapper: Optional[str] = None
    record: Optional[Dict[str, Any]] = None
    header: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_export(self) -> bool:
        return self.record is None

    @property
    def is_potential(self) -> bool:
        return self.is_export or _RECORD_FORMATS[self.kind].potential

    @property
    def pretraining(self) -> Dict[str, Any]:
        """The pretraining record of a pretrained backbone (method, objectives, steps, corpus, ...), else {}."""
        rec = self.record or {}
        info = dict(rec.get("config", {}).get("metadata", {}).get("pretrained", {}))
        info.update({k: v for k, v in rec.get("pretrain", {}).items() if k not in ("heads", "config")})
        return info

    def build(self) -> nn.Module:
        """The module of a record file, rebuilt on the CPU in its stored dtype (not in eval mode)."""
        if self.is_export:
            raise ModelFileError(f"{self.path} is an export ({self.kind}) and cannot be trained further or "
                                 f"fine-tuned; start from the oreo model file it was exported from")
        return _RECORD_FORMATS[self.kind].build(self.record)

    def load(self, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = torch.float32):
        """Ready for inference (eval mode) on ``device`` in ``dtype`` (exports: the dtype they were made in,
        AOTInductor packages also their device)."""
        if self.is_export:
            fmt = next(f for f in _FILE_FORMATS if f.name == self.kind)
            return fmt.load(self.path, self.header, device, dtype).eval()
        return cast_potential(self.build(), device, dtype).eval()

    def trainable(self) -> Potential:
        """A float32 :class:`Potential` in training mode whose weights can be trained further."""
        if not self.is_export and not self.is_potential:
            raise ModelFileError(f"{self.path} is a {self.kind}, not a potential; start from an oreo model file, "
                                 f"a training checkpoint or a pretrained backbone")
        if not self.is_export and _RECORD_FORMATS[self.kind].not_trainable:
            raise ModelFileError(f"{self.path} is an {self.kind} file: {_RECORD_FORMATS[self.kind].not_trainable}")
        pot = self.build()
        pot.set_metadata(name=self.path.stem)
        return cast_potential(pot, "cpu", torch.float32).train()


def _read_record(path: Path) -> Dict[str, Any]:
    try:
        rec = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt, truncated, not a torch file
        raise ModelFileError(f"cannot read model file {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
                             f"not an oreo model; re-download it or re-export it with `oreo export`.") from None
    if not isinstance(rec, dict):
        raise ModelFileError(f"{path} is not an oreo model file (it holds a {type(rec).__name__})")
    return rec


def open_model_file(model: ModelLike) -> ModelFile:
    """Find (a path or a shipped name), recognise and read a model file of any kind (module docstring)."""
    path = resolve_model_path(model)
    _load_plugins()
    for fmt in _FILE_FORMATS:
        header = fmt.sniff(path)
        if header is not None:
            return ModelFile(path, fmt.name, header=header)
    rec = _read_record(path)
    wrapper = rec.get("format") if rec.get("format") in WRAPPERS else None
    if wrapper is not None:
        rec = rec[WRAPPERS[wrapper]]
    kind = rec.get("format")
    if kind not in _RECORD_FORMATS:
        raise ModelFileError(f"{path} is not an oreo model file (format={kind!r}); pass a file written by "
                             f"`oreo train`, `oreo pretrain`, `oreo finetune` or `oreo export`")
    if rec.get("format_version", 0) > _RECORD_FORMATS[kind].version:
        raise ModelFileError(f"{path} was written by a newer oreo (format version {rec['format_version']}); "
                             f"upgrade oreo to load it")
    return ModelFile(path, kind, wrapper, rec)


def load_model(model: ModelLike, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = torch.float32):
    """Any model file (potential, property model, export), ready for inference."""
    return open_model_file(model).load(device, dtype)


def load_potential(model: ModelLike, device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = torch.float32):
    """A potential (model file, checkpoint, run state, pretrained backbone or export), ready for inference.

    Returns a :class:`Potential`, a scripted one, a compiled one, or a committee of potentials
    (:class:`forcefield.committee.Committee`, which gives their mean): all take
    ``(numbers, positions, batch=None, cell=None, pbc=None)``, return ``{"energy", "forces"}`` and have
    ``cutoff`` and ``metadata_json``."""
    mf = open_model_file(model)
    if not mf.is_potential:
        raise ModelFileError(f"{mf.path} is a {mf.kind}, not a potential (it gives no energies or forces); "
                             f"load it with forcefield.io.load_model")
    return mf.load(device, dtype)


def load_trainable_potential(model: ModelLike) -> Potential:
    """An oreo model file, checkpoint or pretrained backbone as a float32 :class:`Potential` whose weights can be
    trained further (exports are frozen: they cannot)."""
    return open_model_file(model).trainable()


# ---------------------------------------------------------------------------- helpers
def cast_potential(mod, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
    """Move/cast a model; the buffers that hold large totals stay float64: the reference energies, and whatever
    else a module lists in ``precise_buffers`` (dotted names; a property model's mean and std)."""
    names = getattr(mod, "precise_buffers", ("atomref",))
    saved = {name: _attr(mod, name).detach().clone() for name in names}
    mod = mod.to(device=device, dtype=dtype) if dtype is not None else mod.to(device=device)
    for name, value in saved.items():
        _attr(mod, name).data = value.to(device=device, dtype=torch.float64)
    return mod


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def metadata_of(module) -> Dict[str, Any]:
    """A loaded model's metadata: its ``metadata`` dict, else the JSON in ``metadata_json`` (TorchScript and
    compiled exports), else {}."""
    meta = getattr(module, "metadata", None)
    if isinstance(meta, dict):
        return dict(meta)
    text = getattr(module, "metadata_json", None)
    if isinstance(text, str):
        try:
            meta = json.loads(text)
        except ValueError:
            return {}
        return dict(meta) if isinstance(meta, dict) else {}
    return {}
