"""Compact run state: a training checkpoint small enough to commit, so that runs add up across fresh clones.

A full checkpoint (``last.pt``) holds the EMA model, the training weights and AdamW's two moments in float32:
16 bytes a parameter. The compact state keeps what a resumed run needs at what it needs:

- the EMA model exactly (float32; it is the model that ships),
- the training weights as an int8 block-quantised difference from the EMA (they differ by the last few hundred
  steps' drift, so the absolute error is ~1e-3 of that drift),
- AdamW's first moment int8 block-quantised, its second moment as block-quantised logarithms over each block's
  non-zero values (uint8, code 0 for an exact zero; relative error up to e^(range/508) - 1, about 2 % for a block
  spanning four decades, never zero where the moment was not),
- schedule, counters, RNG, frame ids, cumulative CPU time and the learning curve rows, as they are.

About 7 bytes a parameter (3.7 MB for the 536k-parameter shipped ET). Resuming from it continues the run
(same data order, same schedule); the weights match the full checkpoint to the quantisation error above.
"""
import math
from typing import Any, Dict

import torch

RUNSTATE_FORMAT = "oreo-runstate"
RUNSTATE_VERSION = 2     # 2: second moments' zeros have a code of their own (version 1 still reads)
BLOCK = 256
_LOG_FLOOR = 1e-30


def _blocks(x: torch.Tensor):
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize_signed(x: torch.Tensor) -> Dict[str, Any]:
    """int8 codes with one float32 absmax scale per block of 256 values."""
    b = _blocks(x)
    scale = b.abs().amax(dim=1, keepdim=True).clamp_min(1e-38) / 127.0
    q = torch.round(b / scale).clamp(-127, 127).to(torch.int8)
    return {"kind": "int8", "q": q, "scale": scale.squeeze(1), "shape": tuple(x.shape), "dtype": str(x.dtype)}


def quantize_positive(x: torch.Tensor) -> Dict[str, Any]:
    """uint8 codes of log(x) between each block's min and max log over its non-zero values (non-negative tensors
    of wide range); code 0 is an exact zero (e.g. the moments of an element's embedding that the data never
    touches), so zeros do not stretch a block's range and cost its other values their precision."""
    raw = _blocks(x)
    nonzero = raw > 0
    b = torch.log(raw.clamp_min(_LOG_FLOOR))
    lo = torch.where(nonzero, b, torch.full_like(b, math.inf)).amin(dim=1, keepdim=True)
    hi = torch.where(nonzero, b, torch.full_like(b, -math.inf)).amax(dim=1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))      # an all-zero block
    hi = torch.where(torch.isfinite(hi), hi, lo)
    span = (hi - lo).clamp_min(1e-12)
    q = 1.0 + torch.round((b - lo) / span * 254.0).clamp(0, 254)
    q = torch.where(nonzero, q, torch.zeros_like(q)).to(torch.uint8)
    return {"kind": "log-uint8-nz", "q": q, "lo": lo.squeeze(1), "hi": hi.squeeze(1), "shape": tuple(x.shape),
            "dtype": str(x.dtype)}


def dequantize(rec: Dict[str, Any]) -> torch.Tensor:
    if rec["kind"] == "int8":
        flat = (rec["q"].float() * rec["scale"].unsqueeze(1)).reshape(-1)
    elif rec["kind"] == "log-uint8-nz":
        lo, hi, q = rec["lo"].unsqueeze(1), rec["hi"].unsqueeze(1), rec["q"].float()
        flat = torch.where(q > 0, torch.exp(lo + (q - 1.0) / 254.0 * (hi - lo)), torch.zeros_like(q)).reshape(-1)
    elif rec["kind"] == "log-uint8":             # run states of version 1: zeros at the floor of the block's range
        lo, hi = rec["lo"].unsqueeze(1), rec["hi"].unsqueeze(1)
        flat = torch.exp(lo + rec["q"].float() / 255.0 * (hi - lo)).reshape(-1)
        flat = torch.where(flat <= _LOG_FLOOR * 1.01, torch.zeros_like(flat), flat)
    else:
        raise ValueError(f"unknown quantised tensor kind {rec['kind']!r}")
    shape = tuple(rec["shape"])
    n = math.prod(shape)
    dtype = getattr(torch, rec["dtype"].replace("torch.", ""))
    return flat[:n].reshape(shape).to(dtype)


def pack_checkpoint(ck: Dict[str, Any], history=None) -> Dict[str, Any]:
    """A full training checkpoint (``Trainer.state()``) -> the compact run state."""
    ema = ck["model"]["state_dict"]
    train_delta = {}
    for k, v in ck["train_model"].items():
        if v.is_floating_point() and k in ema and ema[k].shape == v.shape:
            train_delta[k] = quantize_signed(v - ema[k].to(v.dtype))
        else:
            train_delta[k] = v.clone()       # integer buffers, reference energies: as they are
    opt = ck["optimizer"]
    moments = {}
    for idx, st in opt["state"].items():
        moments[idx] = {name: (quantize_signed(t) if name == "exp_avg" else
                               quantize_positive(t) if name in ("exp_avg_sq", "max_exp_avg_sq") else t)
                        for name, t in st.items()}
    rest = {k: v for k, v in ck.items() if k not in ("train_model", "optimizer")}
    return {**rest, "format": RUNSTATE_FORMAT, "runstate_version": RUNSTATE_VERSION,
            "checkpoint_format": ck["format"], "train_delta": train_delta,
            "optimizer": {"param_groups": opt["param_groups"], "state": moments},
            "history": list(history or [])}


def unpack_runstate(rs: Dict[str, Any]) -> Dict[str, Any]:
    """The compact run state -> a full training checkpoint that ``Trainer.load_checkpoint`` reads."""
    if rs.get("format") != RUNSTATE_FORMAT:
        raise ValueError(f"not an oreo run state (format={rs.get('format')!r})")
    if rs.get("runstate_version", 0) > RUNSTATE_VERSION:
        raise ValueError(f"this run state was written by a newer oreo (version {rs['runstate_version']}); "
                         f"upgrade oreo to resume it")
    if rs.get("archived"):
        raise ValueError(f"this run state is an archived record of a finished run ({rs['archived']}): it keeps the "
                         f"learning curve and counters, not the weights to resume from")
    ema = rs["model"]["state_dict"]
    train = {}
    for k, v in rs["train_delta"].items():
        train[k] = (ema[k] + dequantize(v).to(ema[k].dtype)) if isinstance(v, dict) else v.clone()
    state = {idx: {name: (dequantize(t) if isinstance(t, dict) else t) for name, t in st.items()}
             for idx, st in rs["optimizer"]["state"].items()}
    ck = {k: v for k, v in rs.items() if k not in ("train_delta", "optimizer", "runstate_version",
                                                  "checkpoint_format", "history")}
    ck.update(format=rs["checkpoint_format"], train_model=train,
              optimizer={"param_groups": rs["optimizer"]["param_groups"], "state": state})
    return ck


def is_runstate(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == RUNSTATE_FORMAT
