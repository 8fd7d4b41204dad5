"""oreo: an equivariant machine-learning force field for molecules and polymers.

Quick use::

    from forcefield import OreoCalculator
    atoms.calc = OreoCalculator("aspirin.pt")

What lives here, each thing in one place, lowest layer first (a module imports from its own layer and those
below, never from a layer above):

1. ``units`` (every unit conversion and constant), ``files`` (atomic writes), ``settings`` (config loading with
   type conversion, ``--set``), ``threads``, ``devices`` (the one check of a requested torch device),
   ``allocator`` (malloc policy of compiled inference), ``reference``
   (xTB/DFT labels), ``graph`` (radius graph, pair search, minimum image), ``bonds`` (bonds and MDsim's
   stability criterion), ``models/`` (backbones and heads), ``data/`` (readers -> ConformationSet -> Batch);
2. ``potential``: :class:`Potential`, the one owner of features, per-atom energies (learned part, ZBL repulsion)
   and forces = -dE/dr; every objective, export and property head calls it;
3. ``io`` (model files: one dispatch over every format), ``evaluate`` (predictions and the one MAE/RMSE),
   ``traced`` (the energy + force graph that gets compiled);
4. ``compiled`` (AOTInductor ``.pt2``; registers its format with ``io``), ``committee`` (several potentials
   called as one: mean and spread; registers its format with ``io``), ``export`` (TorchScript), ``calculator``
   (ASE), ``torchsim`` (torch-sim model; optional: the only module that imports ``torch_sim``, and nothing here
   imports it);
5. ``train/`` (configs, splits, the loop skeleton, the trainer), then ``pretrain/`` (corpus, objectives,
   pretraining, fine-tuning, QM9 properties), then ``fit/`` (``oreo fit``: a molecule's own force field by
   active learning: xTB pool, labels, committee fine-tuning, committee MD on ASE, report);
6. ``cli`` (``oreo``: parses arguments, calls the library).

Who may import it: ``md``, ``benchmarks``, ``release``, ``examples`` and ``tests``; nothing in ``forcefield``
imports those.
"""
from .version import __version__

__all__ = ["OreoCalculator", "Potential", "load_potential", "__version__"]


def __getattr__(name):  # lazy imports keep `import forcefield` light (no ASE/torch until needed)
    if name == "OreoCalculator":
        from .calculator import OreoCalculator
        return OreoCalculator
    if name == "Potential":
        from .potential import Potential
        return Potential
    if name == "load_potential":
        from .io import load_potential
        return load_potential
    raise AttributeError(f"module 'forcefield' has no attribute '{name}'")
