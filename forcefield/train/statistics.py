"""Per-element reference energies and the energy scale, fitted on training frames."""
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..data.conformations import ConformationSet


def composition_matrix(cset: ConformationSet, elements: List[int]) -> np.ndarray:
    """(F, n_elements) count of each element in each frame."""
    col = {z: k for k, z in enumerate(elements)}
    frame_of_atom = np.repeat(np.arange(len(cset)), cset.n_atoms)
    counts = np.zeros((len(cset), len(elements)))
    np.add.at(counts, (frame_of_atom, np.vectorize(col.__getitem__)(cset.numbers)), 1.0)
    return counts


def fit_reference_energies(cset: ConformationSet, elements: List[int]) -> Dict[int, float]:
    """Least-squares E ~ sum_Z n_Z E_Z (minimum-norm when compositions do not vary, e.g. one molecule)."""
    if cset.energy is None:
        return {z: 0.0 for z in elements}
    counts = composition_matrix(cset, elements)
    coef, *_ = np.linalg.lstsq(counts, cset.energy, rcond=None)
    return {int(z): float(c) for z, c in zip(elements, coef)}


def reference_energy(cset: ConformationSet, atomref: Dict[int, float]) -> np.ndarray:
    """(F,) sum of reference energies of each frame."""
    table = np.zeros(max(max(atomref), int(cset.numbers.max())) + 1)
    for z, e in atomref.items():
        table[z] = e
    frame_of_atom = np.repeat(np.arange(len(cset)), cset.n_atoms)
    return np.bincount(frame_of_atom, weights=table[cset.numbers], minlength=len(cset))


def energy_scale(cset: ConformationSet, atomref: Dict[int, float]) -> Tuple[float, float]:
    """(scale, shift) of the learned per-atom energy: force RMS (eV/Å, a length scale of 1 Å) and the
    mean residual energy per atom."""
    if cset.forces is not None:
        scale = float(np.sqrt(np.mean(cset.forces ** 2)))
    elif cset.energy is not None and len(cset) > 1:
        scale = float(np.std((cset.energy - reference_energy(cset, atomref)) / cset.n_atoms))
    else:
        scale = 1.0
    shift = 0.0
    if cset.energy is not None:
        shift = float(np.mean((cset.energy - reference_energy(cset, atomref)) / cset.n_atoms))
    return max(scale, 1e-3), shift


def fitted_potential(backbone: Dict, train: ConformationSet, val: Optional[ConformationSet] = None,
                     metadata: Optional[Dict] = None, scale: Optional[float] = None):
    """A new :class:`~forcefield.potential.Potential` for these frames: the elements of ``train`` (and ``val``),
    reference energies and energy scale fitted on ``train`` (``scale``: keep this one instead), the ``backbone``
    config (fresh weights from torch's current random state)."""
    from ..potential import Potential
    elements = sorted(set(train.elements) | (set(val.elements) if val is not None else set()))
    atomref = fit_reference_energies(train, elements)
    fitted, shift = energy_scale(train, atomref)
    return Potential(backbone=dict(backbone), elements=elements, atomref=atomref,
                     scale=fitted if scale is None else scale, shift=shift, metadata=metadata)
