"""Settings: the one way oreo turns YAML, JSON and command-line values into its config dataclasses.

Every config (training, pretraining, corpus, QM9 property, MD simulation) is a dataclass built by
:func:`from_mapping`: unknown keys are errors that list the valid ones, and values are converted to the
field's declared type (YAML 1.1 reads ``1e-3`` as a string, JSON has no int/float distinction), so a wrong
value fails at load time naming its key. :func:`read_yaml` reads a config file with errors that name the fix,
:func:`apply_overrides` / :func:`add_set_argument` are the ``--set section.key=value`` of every command, and
:func:`command_config` is what each command does with ``--config``, ``--resume`` and ``--set``.
"""
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

import yaml

__all__ = ["from_mapping", "read_yaml", "set_in", "apply_overrides", "add_set_argument", "add_state_argument",
           "command_config"]

T = TypeVar("T")
_NONE = type(None)


class _Mismatch(Exception):
    """A value that does not fit one member of a Union (the next member is tried)."""


def from_mapping(cls: Type[T], values: Any, where: str, error: Type[Exception] = ValueError) -> T:
    """The dataclass ``cls`` from a mapping: unknown keys are errors, values are converted to the fields'
    types (nested dataclasses, lists of dataclasses, Optional, Union, List, Dict, bool, int, float, str).
    ``where`` names the section in messages (``optim`` -> ``optim.lr``; "" for a whole config). ``None`` gives the defaults and an
    instance of ``cls`` is returned as it is."""
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise error(f"config section '{where or 'top level'}' must be a mapping of keys to values, got "
                    f"{type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        section = f"in '{where}'" if where else "at the top level"
        raise error(f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; valid keys {section}: "
                    f"{', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"config key(s) {', '.join(prefix + n for n in missing)} missing (required)")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(value, hints.get(name, Any), prefix + name, error) for name, value in values.items()}
    return cls(**kwargs)


def _convert(value: Any, tp: Any, key: str, error: Type[Exception]) -> Any:
    try:
        return _coerce(value, tp, key, error)
    except _Mismatch as exc:
        raise error(str(exc)) from None


def _coerce(value: Any, tp: Any, key: str, error: Type[Exception]) -> Any:
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        members = [a for a in args if a is not _NONE]
        if value is None:
            if _NONE in args:
                return None
            raise _Mismatch(f"config key {key} must not be null")
        for k, member in enumerate(members):
            try:
                return _coerce(value, member, key, error)
            except _Mismatch:
                if k == len(members) - 1:
                    raise
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if value is None or isinstance(value, tp):    # an empty section: its defaults
            return tp() if value is None else value
        if not isinstance(value, dict):
            raise _Mismatch(f"config key {key} must be a mapping, got {value!r}")
        return from_mapping(tp, value, key, error)
    if value is None:
        raise _Mismatch(f"config key {key} must not be null (give a value or leave the key out)")
    if origin in (list, List, Sequence, tuple):
        item = args[0] if args else Any
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, item, f"{key}[{i}]", error) for i, v in enumerate(items)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise _Mismatch(f"config key {key} must be a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}", error) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch(f"config key {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch(f"config key {key} must be a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _Mismatch(f"config key {key} must be a whole number, got {value!r}") from None
        if not number.is_integer():
            raise _Mismatch(f"config key {key} must be a whole number, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _Mismatch(f"config key {key} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise _Mismatch(f"config key {key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch(f"config key {key} must be text, got {value!r}")
    return value


def read_yaml(path: Union[str, Path], what: str = "config", hint: str = "see examples/configs/") -> Any:
    """A YAML file's content; a missing or malformed file is an error naming the file and ``hint``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} not found; {hint}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} file {p} is not valid YAML: {exc}") from None


def set_in(d: Dict[str, Any], key: str, value: Any) -> Dict[str, Any]:
    """``d["a"]["b"] = value`` for ``key="a.b"``, creating (or replacing null) sections on the way."""
    path = key.split(".")
    node = d
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return d


def apply_overrides(d: Dict[str, Any], overrides: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``section.key=value`` items (``--set``) into the nested mapping ``d`` (changed in place and returned);
    the value is parsed as YAML (``optim.lr=3e-4``, ``data.polymers=[PE, PS]``), the key may be nested deeper
    (``objectives.weights.zero_force=0.5``)."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ValueError(f"--set expects section.key=value (e.g. optim.max_minutes=30), got '{item}'")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote it or "
                             f"fix it, e.g. --set data.polymers='[PE, PS]'") from None
        set_in(d, ".".join(path), parsed)
    return d


def add_set_argument(parser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) on an argparse (sub)command."""
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a config value (parsed as YAML; repeatable), e.g. --set optim.lr=3e-4")


def add_state_argument(parser) -> None:
    """``--state FILE`` on a training command (train, pretrain, finetune): the compact run state of
    :mod:`forcefield.train.loop`."""
    parser.add_argument("--state", type=Path, metavar="FILE",
                        help="also keep a compact run state (~7 bytes a parameter, small enough to commit) in FILE, "
                             "written with every checkpoint; with --resume, a fresh clone continues from it")


def command_config(config: Optional[Union[str, Path]], out: Union[str, Path], resume: bool,
                   overrides: Optional[Sequence[str]] = None, saved: str = "config.yaml",
                   what: str = "config", hint: str = "see examples/configs/") -> Dict[str, Any]:
    """The config mapping of a command: ``--config`` FILE, else (with ``--resume``) the ``saved`` file the run
    in ``out`` recorded, else empty; then the ``--set`` overrides."""
    d: Any = None
    if config:
        d = read_yaml(config, what, hint)
    elif resume and (Path(out) / saved).is_file():
        d = read_yaml(Path(out) / saved, what, hint)
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"the {what} must be a mapping of sections (data, model, optim, ...), got "
                         f"{type(d).__name__}")
    return apply_overrides(d, overrides)
