"""Small analytic potentials with the batched potential interface.

They follow the same call signature as ``forcefield.load_potential(...)`` modules,
``pot(numbers, positions, batch, cell=None, pbc=None) -> {"energy": (B,), "forces": (N, 3)}``
(forces by autograd), so they can stand in for a trained model in tests, demos and
benchmarks (model spec ``py:md.analytic:<factory>``).

- :class:`LennardJones` — all pairs within each system, optional periodic minimum image.
- :class:`BondNetwork` — harmonic or Morse springs between pairs of a reference geometry
  (an elastic network of a molecule; Morse springs can break);
  :func:`bond_network` builds one on the bonds and angles of an rMD17 molecule
  (``--model py:md.analytic:bond_network``).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from forcefield.graph import minimum_image, same_structure_pairs


def _pair_vectors(positions, i, j, batch, cell=None, pbc=None):
    """Vectors r_j - r_i (P, 3), minimum image along periodic directions (valid for cutoffs
    below half the cell width)."""
    d = positions[j] - positions[i]
    if cell is not None and pbc is not None and bool(pbc.any()):
        d = minimum_image(d, cell[batch[i]], pbc[batch[i]])
    return d


class _Analytic(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.register_buffer("_dtype_probe", torch.zeros((), dtype=dtype))
        self.metadata: Dict[str, object] = {"molecule": None}

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    def pair_energy(self, r: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pairs(self, numbers, batch):
        pairs = same_structure_pairs(batch)
        return pairs[0], pairs[1]

    def forward(self, numbers, positions, batch, cell=None, pbc=None):
        positions = positions.detach().requires_grad_(True)
        n_sys = int(batch.max()) + 1 if batch.numel() else 0
        i, j = self.pairs(numbers, batch)
        r = _pair_vectors(positions, i, j, batch, cell, pbc).norm(dim=1)
        e_pair = self.pair_energy(r, i, j)
        energy = torch.zeros(n_sys, dtype=positions.dtype, device=positions.device).index_add_(0, batch[i], e_pair)
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=self.training)
        return {"energy": energy, "forces": -grad}


class LennardJones(_Analytic):
    """12-6 Lennard-Jones, energy shifted to zero at ``cutoff`` (Å). ``epsilon`` eV, ``sigma`` Å."""

    def __init__(self, epsilon: float = 0.0104, sigma: float = 3.4, cutoff: float = 8.5, dtype=torch.float64):
        super().__init__(dtype)
        self.epsilon, self.sigma, self.cutoff = float(epsilon), float(sigma), float(cutoff)
        sr6 = (self.sigma / self.cutoff) ** 6
        self._shift = 4.0 * self.epsilon * (sr6 * sr6 - sr6)

    def pair_energy(self, r, i, j):
        sr6 = (self.sigma / r) ** 6
        e = 4.0 * self.epsilon * (sr6 * sr6 - sr6) - self._shift
        return torch.where(r < self.cutoff, e, torch.zeros_like(e))


class BondNetwork(_Analytic):
    """Springs between the atom pairs of a reference geometry closer than ``cutoff`` Å.

    Every system in the batch must be the same molecule in the same atom order as the
    reference (``ref_numbers`` (n,), ``ref_positions`` (n, 3) Å). ``kind="harmonic"``:
    ``0.5 k (r - r0)²`` with ``k`` eV/Å²; ``kind="morse"``: ``D (1 - exp(-a (r - r0)))²`` with
    depth ``D`` eV and ``a = sqrt(k / 2D)`` (so both have the same curvature at ``r0``).
    """

    def __init__(self, ref_numbers, ref_positions, cutoff: float = 2.6, k: float = 20.0,
                 kind: str = "harmonic", depth: float = 4.0, pairs=None, dtype=torch.float64):
        super().__init__(dtype)
        z = np.asarray(ref_numbers, dtype=np.int64).reshape(-1)
        x = np.asarray(ref_positions, dtype=np.float64).reshape(-1, 3)
        if kind not in ("harmonic", "morse"):
            raise ValueError(f"BondNetwork kind must be 'harmonic' or 'morse', got '{kind}'")
        if pairs is None:
            ii, jj = np.triu_indices(len(z), 1)
            keep = np.linalg.norm(x[jj] - x[ii], axis=1) < cutoff
            ii, jj = ii[keep], jj[keep]
        else:
            pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
            ii, jj = pairs[:, 0], pairs[:, 1]
        r0 = np.linalg.norm(x[jj] - x[ii], axis=1)
        self.register_buffer("ref_numbers", torch.as_tensor(z))
        self.register_buffer("pi", torch.as_tensor(ii))
        self.register_buffer("pj", torch.as_tensor(jj))
        self.register_buffer("r0", torch.as_tensor(r0, dtype=dtype))
        self.k, self.kind, self.depth, self.cutoff = float(k), kind, float(depth), float(cutoff)
        self._a = float(np.sqrt(self.k / (2.0 * self.depth)))

    def pairs(self, numbers, batch):
        n = self.ref_numbers.shape[0]
        n_sys = int(batch.max()) + 1
        if batch.shape[0] != n * n_sys or not torch.equal(numbers.view(n_sys, n), self.ref_numbers.expand(n_sys, n)):
            raise ValueError("BondNetwork: every system must be the reference molecule in the reference atom order")
        offset = (torch.arange(n_sys, device=batch.device) * n).unsqueeze(1)
        return (self.pi.unsqueeze(0) + offset).reshape(-1), (self.pj.unsqueeze(0) + offset).reshape(-1)

    def pair_energy(self, r, i, j):
        r0 = self.r0.repeat(r.shape[0] // self.r0.shape[0])
        if self.kind == "harmonic":
            return 0.5 * self.k * (r - r0) ** 2
        return self.depth * (1.0 - torch.exp(-self._a * (r - r0))) ** 2


def bond_network(molecule: str, data_dir=None) -> BondNetwork:
    """Model-spec factory (``py:md.analytic:bond_network``): a float64 harmonic
    :class:`BondNetwork` on the bonds and bond angles (1-2 and 1-3 pairs, see
    :func:`topology_pairs`) of the first training frame of the rMD17 ``molecule``. Torsions are
    free, so any conformer of the molecule is a low-energy start."""
    from .frames import load_frames
    if not molecule:
        raise ValueError("py:md.analytic:bond_network needs --molecule")
    frames = load_frames(molecule, "train", data_dir)
    z, x = frames.frame_numbers(0), frames.frame_positions(0)
    pot = BondNetwork(z, x, pairs=topology_pairs(z, x))
    pot.metadata = {"molecule": molecule, "kind": "analytic bond network"}
    return pot



def topology_pairs(numbers, positions) -> np.ndarray:
    """1-2 (bonded, ASE natural cutoffs) and 1-3 (sharing a bonded neighbour) atom pairs (P, 2), i < j."""
    from .metrics import find_bonds
    bonds = find_bonds(numbers, positions)
    neighbours = {}
    for i, j in bonds.tolist():
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    pairs = {tuple(b) for b in bonds.tolist()}
    for centre, nbrs in neighbours.items():
        nbrs = sorted(nbrs)
        pairs.update((a, b) for n, a in enumerate(nbrs) for b in nbrs[n + 1:])
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
