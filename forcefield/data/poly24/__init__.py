"""oreo-poly24: a 24-polymer conformation set with GFN2-xTB (or DFT) labels, and polymer loaders.

- :mod:`.catalog` - the 24 polymers (repeat-unit SMILES, oligomer length)
- :mod:`.build` - H-capped oligomers in 3D (RDKit)
- :mod:`.sampling` - one xTB Langevin trajectory with labelled frames (tblite)
- :mod:`.generate` - the whole set, resumable, split by trajectory, with a manifest
- :mod:`.loader` - :func:`load_poly24` and :func:`load_polymer_set` (external poly24-style files)

Generation needs ``pip install 'oreo[poly24]'`` (rdkit, tblite); loading needs only ase.

Part of :mod:`forcefield.data` (imports it, ``forcefield.files`` and ``forcefield.reference`` for labels);
imported by the training splits, the corpus, ``oreo data poly24`` and ``md.poly24``.
"""
from .catalog import POLYMERS, Polymer, canonical_polymer, select_polymers
from .loader import load_poly24, load_polymer_set, poly24_root, read_manifest

__all__ = ["POLYMERS", "Polymer", "canonical_polymer", "select_polymers", "load_poly24", "load_polymer_set",
           "poly24_root", "read_manifest"]
