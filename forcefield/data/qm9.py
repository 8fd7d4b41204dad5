"""QM9 (Ramakrishnan et al. 2014): 133,885 small organic molecules (H, C, N, O, F; up to 9 heavy atoms),
geometries relaxed at B3LYP/6-31G(2df,p), with their properties.

Three on-disk forms are read, all into Å and eV:

``qm9pack`` (PyPI package, MIT)
    CSV files ``qm9_part{1,2,3}.csv`` inside the installed package (130,831 molecules: the 3,054
    "uncharacterized" ones are left out upstream). Columns used: ``Index``, ``Elements``, ``XYZ_Ang`` and the
    property columns (``HOMO_au`` ...). A single CSV with the same columns is read too.
upstream xyz archive (figshare ``dsgdb9nsd.xyz.tar.bz2``)
    one ``dsgdb9nsd_NNNNNN.xyz`` file per molecule: line 1 the atom count, line 2 ``gdb <index>`` and 15
    properties, then one line per atom ``symbol x y z q_mulliken``, frequencies, SMILES, InChI. Numbers may
    use Mathematica's ``*^`` exponent. Read from the archive itself (``.tar.bz2``/``.tar.gz``/``.tar``), a
    folder of the files, or one file.
SchNetPack ASE database (``qm9.db``)
    rows with the properties in ``row.data`` (units in the database metadata; Hartree for energies). SchNetPack
    writes the molecules in index order, all 133,885 (row id = QM9 index) or, with ``remove_uncharacterized``,
    the 130,831 characterized ones one after another (row k = the k-th characterized index): a database of
    exactly 130,831 rows is read the second way (:func:`qm9_index_of_db_rows`).

``frame_id`` is the QM9 molecule index (1..133885), ``equilibrium`` is True,
``energy`` is U0 (eV) when the source has it.

Split: :func:`qm9_split_labels` assigns every QM9 index to train/val/test by a named scheme, so a molecule
lands in the same split whichever form the data is read from. The default, ``"torchmd-net"``, is the split of
TorchMD-Net's ET on QM9 (the architecture and setting ET-OREO builds on): of the 130,831 characterized
molecules in index order, a ``numpy.random.default_rng(1)`` permutation gives 110,000 train, 10,000 val and the
other 10,831 test (TorchMD-Net's ``train_val_test_split`` with its default seed 1 over PyTorch Geometric's QM9,
which holds the same molecules in the same order); the 3,054 uncharacterized molecules are in no split.
``"seeded-80-10-10"`` is oreo's earlier split (80/10/10 of 1..133885 by a seeded permutation), kept to
reproduce what was made with it (the first shipped pretrained backbones read its train part). Pretraining
reads ``split="train"`` only; property fine-tuning trains on ``train``, selects on ``val`` and reports ``test``.
"""
from __future__ import annotations

import functools
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from ase import units
from ase.data import atomic_numbers as _SYMBOL_TO_Z

from .conformations import ConformationSet
from .paths import DataNotFoundError, PathLike, resolve_data_dir

__all__ = ["QM9_N_MOLECULES", "QM9_PROPERTIES", "QM9Data", "read_qm9", "load_qm9", "qm9_split_labels",
           "qm9_uncharacterized", "parse_qm9_xyz", "QM9_SPLIT", "QM9_SPLIT_SCHEMES"]

QM9_N_MOLECULES = 133885
#: the default split scheme (fixed: changing it would move molecules between pretraining and the property test)
QM9_SPLIT = "torchmd-net"
QM9_SPLIT_SCHEMES = ("torchmd-net", "seeded-80-10-10")
_TORCHMD_NET_SIZES = (110_000, 10_000)   # train, val; test: the other 10,831 characterized molecules
_TORCHMD_NET_SEED = 1                    # TorchMD-Net's default --seed
_LEGACY_SEED = 20140805                  # seeded-80-10-10
_LEGACY_FRACTIONS = (0.8, 0.1, 0.1)
LEVEL_OF_THEORY = "B3LYP/6-31G(2df,p)"

_HA = units.Hartree


@dataclass(frozen=True)
class _Prop:
    qm9pack: str      # column of the qm9pack CSV
    xyz: int          # position among the 15 properties of line 2 of an upstream xyz file
    db: str           # key in a SchNetPack database row's data
    factor: float     # to the unit below
    unit: str


#: Properties read from QM9 (name -> where it is and its unit after conversion).
QM9_PROPERTIES: Dict[str, _Prop] = {
    "A": _Prop("RotA_GHz", 0, "rotational_constant_A", 1.0, "GHz"),
    "B": _Prop("RotB_GHz", 1, "rotational_constant_B", 1.0, "GHz"),
    "C": _Prop("RotC_GHz", 2, "rotational_constant_C", 1.0, "GHz"),
    "mu": _Prop("Dipole_debye", 3, "dipole_moment", 1.0, "D"),
    "alpha": _Prop("Polarizability_bohr3", 4, "isotropic_polarizability", 1.0, "a0^3"),
    "homo": _Prop("HOMO_au", 5, "homo", _HA, "eV"),
    "lumo": _Prop("LUMO_au", 6, "lumo", _HA, "eV"),
    "gap": _Prop("HOMO_LUMO_gap_au", 7, "gap", _HA, "eV"),
    "r2": _Prop("R2_bohr2", 8, "electronic_spatial_extent", 1.0, "a0^2"),
    "zpve": _Prop("ZPVE_au", 9, "zpve", _HA, "eV"),
    "U0": _Prop("InternalEnergy_0K_au", 10, "energy_U0", _HA, "eV"),
    "U": _Prop("InternalEnergy_298K_au", 11, "energy_U", _HA, "eV"),
    "H": _Prop("Enthalphy_298K_au", 12, "enthalpy_H", _HA, "eV"),
    "G": _Prop("GibbsFreeEnergy_298K_au", 13, "free_energy", _HA, "eV"),
    "Cv": _Prop("Heatcapacity_Cv_cal_mol_K", 14, "heat_capacity", 1.0, "cal/mol/K"),
}
DEFAULT_PROPERTIES = ("homo", "lumo", "gap", "U0")


# ---------------------------------------------------------------------------- split
@functools.lru_cache(maxsize=1)
def qm9_uncharacterized() -> np.ndarray:
    """The 3,054 QM9 indices of upstream ``uncharacterized.txt`` (shipped with oreo, sorted)."""
    path = Path(__file__).with_name("qm9_uncharacterized.txt")
    out = np.loadtxt(path, dtype=np.int64, comments="#")
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=2)
def _split_table(scheme: str) -> np.ndarray:
    """Split code per QM9 index (position i - 1): 0 train, 1 val, 2 test, 3 in no split."""
    code = np.full(QM9_N_MOLECULES, 3, dtype=np.int8)
    if scheme == "torchmd-net":
        ok = np.ones(QM9_N_MOLECULES, dtype=bool)
        ok[qm9_uncharacterized() - 1] = False
        members = np.flatnonzero(ok)                          # characterized molecules in index order
        perm = np.random.default_rng(_TORCHMD_NET_SEED).permutation(len(members))
        ntr, nva = _TORCHMD_NET_SIZES
        code[members[perm[:ntr]]] = 0
        code[members[perm[ntr:ntr + nva]]] = 1
        code[members[perm[ntr + nva:]]] = 2
    elif scheme == "seeded-80-10-10":
        perm = np.random.default_rng(_LEGACY_SEED).permutation(QM9_N_MOLECULES)
        rank = np.empty(QM9_N_MOLECULES, dtype=np.int64)
        rank[perm] = np.arange(QM9_N_MOLECULES)
        u = rank / QM9_N_MOLECULES
        code[:] = 2
        code[u < _LEGACY_FRACTIONS[0] + _LEGACY_FRACTIONS[1]] = 1
        code[u < _LEGACY_FRACTIONS[0]] = 0
    else:
        raise ValueError(f"unknown QM9 split scheme '{scheme}'; known: {', '.join(QM9_SPLIT_SCHEMES)}")
    code.flags.writeable = False
    return code


def qm9_split_labels(index: Iterable[int], scheme: str = QM9_SPLIT) -> np.ndarray:
    """``"train"``/``"val"``/``"test"`` (``"none"`` for the uncharacterized molecules, which the
    ``torchmd-net`` scheme leaves out) for each QM9 index (1-based), independent of which molecules a source
    holds. Schemes: see the module docstring."""
    index = np.asarray(list(index) if not isinstance(index, np.ndarray) else index, dtype=np.int64)
    if len(index) and (index.min() < 1 or index.max() > QM9_N_MOLECULES):
        raise ValueError(f"QM9 indices must lie in 1..{QM9_N_MOLECULES}")
    names = np.array(["train", "val", "test", "none"])
    return names[_split_table(scheme)[index - 1]]


# ---------------------------------------------------------------------------- container
@dataclass
class QM9Data:
    """QM9 molecules and their properties, aligned frame by frame."""
    conformations: ConformationSet
    properties: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.conformations)

    @property
    def index(self) -> np.ndarray:
        return self.conformations.frame_id

    def subset(self, frames) -> "QM9Data":
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        return QM9Data(self.conformations.subset(frames), {k: v[frames] for k, v in self.properties.items()})

    def target(self, name: str) -> np.ndarray:
        if name not in self.properties:
            raise KeyError(f"property '{name}' was not read; available: {', '.join(self.properties)}")
        return self.properties[name]


# ---------------------------------------------------------------------------- number parsing
def _float(text: str) -> float:
    """Floats as QM9 writes them, including Mathematica's ``1.2*^-6``."""
    return float(text.replace("*^", "e"))


def parse_qm9_xyz(text: str, where: str = "<string>") -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One upstream QM9 xyz file -> (index, numbers (n,), positions (n, 3) Å, properties (15,) raw units)."""
    lines = text.splitlines()
    try:
        n = int(lines[0].split()[0])
        head = lines[1].split()
        if head[0].lower() != "gdb":
            raise ValueError("line 2 does not start with 'gdb'")
        index = int(head[1])
        props = np.array([_float(t) for t in head[2:17]], dtype=np.float64)
        if len(props) != 15:
            raise ValueError(f"line 2 holds {len(props)} properties, expected 15")
        numbers = np.empty(n, dtype=np.int64)
        pos = np.empty((n, 3), dtype=np.float64)
        for a in range(n):
            tok = lines[2 + a].split()
            numbers[a] = _SYMBOL_TO_Z[tok[0]]
            pos[a] = [_float(t) for t in tok[1:4]]
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"{where}: not an upstream QM9 xyz file ({type(exc).__name__}: {exc})") from None
    return index, numbers, pos, props


# ---------------------------------------------------------------------------- readers (raw records)
class _Records:
    def __init__(self):
        self.index: List[int] = []
        self.numbers: List[np.ndarray] = []
        self.positions: List[np.ndarray] = []
        self.props: Dict[str, List[float]] = {}

    def arrays(self, properties: Sequence[str]):
        index = np.asarray(self.index, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        counts = np.array([len(self.numbers[i]) for i in order], dtype=np.int64)
        numbers = np.concatenate([self.numbers[i] for i in order]) if len(order) else np.zeros(0, np.int64)
        positions = np.concatenate([self.positions[i] for i in order]) if len(order) else np.zeros((0, 3))
        props = {k: np.asarray(self.props[k], dtype=np.float64)[order] for k in properties if k in self.props}
        return index[order], counts, numbers, positions, props


def _qm9pack_files(path: Optional[Path]) -> List[Path]:
    if path is None:
        # locate the package's data without importing it (its __init__ needs pkg_resources/setuptools)
        import importlib.util
        spec = importlib.util.find_spec("qm9pack")
        if spec is None or not spec.submodule_search_locations:
            raise DataNotFoundError("the qm9pack package", [], hint="install it with `pip install qm9pack` "
                                    "(MIT, ships all 130,831 QM9 molecules), or pass the path of the upstream "
                                    "dsgdb9nsd.xyz.tar.bz2 archive")
        path = Path(list(spec.submodule_search_locations)[0]) / "data"
    if path.is_file():
        return [path]
    files = sorted(path.glob("qm9_part*.csv"))
    if not files:
        raise DataNotFoundError("qm9_part*.csv", [path / "qm9_part1.csv"])
    return files


def _read_qm9pack(files: Sequence[Path], properties: Sequence[str]) -> _Records:
    """qm9pack CSVs with the standard library's csv module (no pandas needed)."""
    import csv
    import sys
    csv.field_size_limit(sys.maxsize)
    cols = ["Index", "Elements", "XYZ_Ang"] + [QM9_PROPERTIES[p].qm9pack for p in properties]
    table: List[List[str]] = [[] for _ in cols]
    for f in files:
        with open(f, newline="") as fh:
            reader = csv.reader(fh)
            head = next(reader, [])
            missing = [c for c in cols if c not in head]
            if missing:
                raise ValueError(f"{f} is not a qm9pack CSV: missing columns {missing}")
            pick = [head.index(c) for c in cols]
            for row in reader:
                if row:
                    for k, j in enumerate(pick):
                        table[k].append(row[j])
    strip = str.maketrans("", "", "[] '\"")
    elements, xyz_text = table[1], table[2]
    symbols = ",".join(elements).translate(strip).split(",") if elements else []
    try:
        numbers = np.array([_SYMBOL_TO_Z[s] for s in symbols], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"qm9pack CSV: unknown element symbol {exc}") from None
    xyz = (np.array(",".join(xyz_text).translate(strip).split(","), dtype=np.float64).reshape(-1, 3)
           if xyz_text else np.zeros((0, 3)))
    counts = np.array([e.count(",") + 1 for e in elements], dtype=np.int64)
    if counts.sum() != len(numbers) or len(xyz) != len(numbers):
        raise ValueError("qm9pack CSV: element lists and coordinate lists disagree in length")
    rec = _Records()
    starts = np.concatenate([[0], np.cumsum(counts)])
    rec.index = [int(float(i)) for i in table[0]]
    rec.numbers = [numbers[starts[k]:starts[k + 1]] for k in range(len(counts))]
    rec.positions = [xyz[starts[k]:starts[k + 1]] for k in range(len(counts))]
    for k, p in enumerate(properties):
        rec.props[p] = (np.asarray(table[3 + k], dtype=np.float64) * QM9_PROPERTIES[p].factor).tolist()
    return rec


def _add_xyz(rec: _Records, text: str, where: str, properties: Sequence[str]) -> None:
    index, numbers, pos, raw = parse_qm9_xyz(text, where)
    rec.index.append(index)
    rec.numbers.append(numbers)
    rec.positions.append(pos)
    for p in properties:
        rec.props.setdefault(p, []).append(raw[QM9_PROPERTIES[p].xyz] * QM9_PROPERTIES[p].factor)


_XYZ_NAME = re.compile(r"dsgdb9nsd_\d+\.xyz$")


def _read_xyz_source(path: Path, properties: Sequence[str], max_molecules: Optional[int]) -> _Records:
    rec = _Records()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _XYZ_NAME.search(p.name))
        if not files:
            raise DataNotFoundError("dsgdb9nsd_*.xyz", [path / "dsgdb9nsd_000001.xyz"])
        for f in files[:max_molecules]:
            _add_xyz(rec, f.read_text(), str(f), properties)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if max_molecules is not None and len(rec.index) >= max_molecules:
                    break
                if member.isfile() and _XYZ_NAME.search(member.name):
                    text = tar.extractfile(member).read().decode()
                    _add_xyz(rec, text, f"{path}:{member.name}", properties)
    else:
        _add_xyz(rec, path.read_text(), str(path), properties)
    return rec


def qm9_index_of_db_rows(row_ids: Sequence[int], n_rows: int) -> np.ndarray:
    """QM9 indices of a SchNetPack database's rows. SchNetPack writes the molecules in index order: all 133,885
    (row id = index), or without the 3,054 uncharacterized ones (``remove_uncharacterized``), whose 130,831 rows
    are the characterized indices in order, so row 58 is molecule 59. A database of ``n_rows`` = 130,831 is read
    the second way; any other (a subset written by hand, the full set) keeps row id = index."""
    row_ids = np.asarray(row_ids, dtype=np.int64)
    n_characterized = QM9_N_MOLECULES - len(qm9_uncharacterized())
    if n_rows != n_characterized:
        return row_ids
    if len(row_ids) and (row_ids.min() < 1 or row_ids.max() > n_characterized):
        raise ValueError(f"a QM9 database of {n_rows} rows (SchNetPack without the uncharacterized molecules) has "
                         f"row ids 1..{n_characterized}, got {row_ids.min()}..{row_ids.max()}; rebuild it with "
                         f"SchNetPack, or use the upstream archive or qm9pack")
    ok = np.ones(QM9_N_MOLECULES, dtype=bool)
    ok[qm9_uncharacterized() - 1] = False
    return np.flatnonzero(ok)[row_ids - 1] + 1


def _read_db(path: Path, properties: Sequence[str]) -> _Records:
    import ase.db
    rec = _Records()
    with ase.db.connect(path) as db:
        units_in_db = (db.metadata or {}).get("_property_unit_dict", {})
        n_rows = db.count()
        for row in db.select():
            rec.index.append(int(row.id))
            rec.numbers.append(np.asarray(row.numbers, dtype=np.int64))
            rec.positions.append(np.asarray(row.positions, dtype=np.float64))
            data = row.data or {}
            for p in properties:
                key = QM9_PROPERTIES[p].db
                if key not in data:
                    raise ValueError(f"{path}: row {row.id} has no '{key}' (property '{p}')")
                factor = QM9_PROPERTIES[p].factor
                if QM9_PROPERTIES[p].unit == "eV" and units_in_db.get(key, "Ha") not in ("Ha", "Hartree"):
                    factor = {"eV": 1.0, "meV": 1e-3}[units_in_db[key]]
                rec.props.setdefault(p, []).append(float(np.asarray(data[key]).reshape(-1)[0]) * factor)
    rec.index = qm9_index_of_db_rows(rec.index, n_rows).tolist()
    return rec


@functools.lru_cache(maxsize=2)
def _read_cached(kind: str, path: str, stamp: Tuple, properties: Tuple[str, ...], max_molecules: Optional[int]):
    p = Path(path) if path else None
    if kind == "qm9pack":
        rec = _read_qm9pack(_qm9pack_files(p), properties)
    elif kind == "db":
        rec = _read_db(p, properties)
    else:
        rec = _read_xyz_source(p, properties, max_molecules)
    out = rec.arrays(properties)
    for a in (out[0], out[1], out[2], out[3], *out[4].values()):
        a.flags.writeable = False
    return out


def _stamp(path: Optional[Path]) -> Tuple:
    if path is None or not path.exists():
        return ()
    st = path.stat()
    return (st.st_mtime_ns, st.st_size)


def _resolve_source(source: Optional[Union[str, PathLike]], data_dir: Optional[PathLike]) -> Tuple[str, Optional[Path]]:
    """-> (kind, path) with kind in qm9pack, db, xyz."""
    if source is None:
        base = resolve_data_dir(data_dir) / "qm9"
        for name in ("dsgdb9nsd.xyz.tar.bz2", "dsgdb9nsd.xyz.tar", "dsgdb9nsd.xyz", "qm9.db"):
            cand = base / name
            if cand.exists():
                return ("db" if name.endswith(".db") else "xyz"), cand
        return "qm9pack", None
    if str(source).lower() == "qm9pack":
        return "qm9pack", None
    path = Path(source).expanduser()
    if not path.exists():
        raise DataNotFoundError(str(path), [path.resolve()])
    if path.suffix == ".db":
        return "db", path
    if path.suffix == ".csv" or (path.is_dir() and any(path.glob("qm9_part*.csv"))):
        return "qm9pack", path
    return "xyz", path


def _read_uncharacterized(spec) -> np.ndarray:
    """Indices from the upstream ``uncharacterized.txt`` (first integer of each data line) or an iterable."""
    if spec is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(spec, (str, os.PathLike)):
        out = []
        for line in Path(spec).read_text().splitlines():
            tok = line.split()
            if tok and tok[0].isdigit():
                out.append(int(tok[0]))
        return np.asarray(out, dtype=np.int64)
    return np.asarray(list(spec), dtype=np.int64)


# ---------------------------------------------------------------------------- public API
def read_qm9(source: Optional[Union[str, PathLike]] = None, split: str = "all",
             properties: Sequence[str] = DEFAULT_PROPERTIES, max_molecules: Optional[int] = None,
             data_dir: Optional[PathLike] = None, split_scheme: str = QM9_SPLIT, uncharacterized=None,
             max_atoms: Optional[int] = None) -> QM9Data:
    """QM9 molecules of one split with their properties (energies in eV).

    Args:
        source: ``None`` (``<data_dir>/qm9/dsgdb9nsd.xyz.tar.bz2`` or ``qm9.db`` if there, else the
            qm9pack package), ``"qm9pack"``, or a path: upstream archive / folder / xyz file, a qm9pack CSV
            (or folder of them), a SchNetPack ``.db``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (every molecule the source holds).
        split_scheme: which split (:data:`QM9_SPLIT_SCHEMES`, see :func:`qm9_split_labels`).
        properties: names from :data:`QM9_PROPERTIES`.
        max_molecules: keep the first N molecules (by index) of the split; for archives, reading also stops
            after N files (handy for quick tests).
        uncharacterized: path of the upstream ``uncharacterized.txt`` or indices to drop (the qm9pack data
            already lacks them).
        max_atoms: drop molecules with more atoms.
    """
    unknown = [p for p in properties if p not in QM9_PROPERTIES]
    if unknown:
        raise ValueError(f"unknown QM9 properties {unknown}; known: {', '.join(QM9_PROPERTIES)}")
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be train, val, test or all, got '{split}'")
    if split_scheme not in QM9_SPLIT_SCHEMES:
        raise ValueError(f"unknown QM9 split scheme '{split_scheme}'; known: {', '.join(QM9_SPLIT_SCHEMES)}")
    kind, path = _resolve_source(source, data_dir)
    props = tuple(dict.fromkeys(properties))
    index, counts, numbers, positions, values = _read_cached(
        kind, str(path) if path else "", _stamp(path), props, max_molecules if kind == "xyz" else None)
    keep = np.ones(len(index), dtype=bool)
    if split != "all":
        keep &= qm9_split_labels(index, split_scheme) == split
    bad = _read_uncharacterized(uncharacterized)
    if len(bad):
        keep &= ~np.isin(index, bad)
    if max_atoms is not None:
        keep &= counts <= max_atoms
    frames = np.flatnonzero(keep)
    if max_molecules is not None:
        frames = frames[:max_molecules]
    ptr_all = np.concatenate([[0], np.cumsum(counts)])
    full = ConformationSet(numbers=numbers.copy(), positions=positions.copy(), ptr=ptr_all,
                           energy=values["U0"].copy() if "U0" in values else None,
                           frame_id=index.copy(), equilibrium=np.ones(len(index), dtype=bool),
                           source=f"qm9/{split}",
                           meta={"dataset": "qm9", "reader": kind, "path": str(path) if path else "qm9pack",
                                 "split": split, "split_scheme": split_scheme,
                                 "level_of_theory": LEVEL_OF_THEORY,
                                 "units": {"positions": "Å", "energy": "eV (U0)"},
                                 "property_units": {p: QM9_PROPERTIES[p].unit for p in props},
                                 "frame_id": "QM9 molecule index (gdb number)"})
    cset = full.subset(frames)
    return QM9Data(cset, {k: v[frames].copy() for k, v in values.items()})


def load_qm9(source: Optional[Union[str, PathLike]] = None, split: str = "train", **kw) -> ConformationSet:
    """QM9 geometries of one split as a :class:`ConformationSet` (equilibrium frames, energy = U0 in eV)."""
    kw.setdefault("properties", ("U0",))
    return read_qm9(source, split=split, **kw).conformations
