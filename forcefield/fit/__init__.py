"""``oreo fit``: from a molecule (SMILES or a structure file) to its own force field, with labels chosen by the
model's own uncertainty (active learning with a committee).

- :mod:`.config` - :class:`FitConfig`, the settings (stored in ``DIR/fit.json``; which may change on a rerun)
- :mod:`.state` - the run folder's layout and its manifest ``fit.json`` (stages done, rounds, wall times)
- :mod:`.pool` - conformers (RDKit) and the GFN2-xTB MD candidate pool (the poly24 sampler)
- :mod:`.select` - descriptors, farthest-point sampling, selection by committee spread (or at random)
- :mod:`.label` - PySCF / GFN2-xTB labels, one file per frame, in parallel processes
- :mod:`.training` - the committee: members fine-tuned from a pretrained backbone (or from scratch) with the
  project's trainer, saved as one committee file
- :mod:`.explore` - committee MD (ASE Langevin through OreoCalculator): candidate frames and their spread
- :mod:`.loop` - :func:`run_fit`, the stages and rounds; :mod:`.report` - report.md and plots
- :mod:`.cli` - the ``oreo fit`` subcommand (registered by :mod:`forcefield.cli`)

Layer: above ``train/`` and ``pretrain/`` (imports them, ``committee``, ``calculator``, ``io``, ``evaluate``,
``reference``, ``data`` with ``data.poly24``'s builder and sampler, ``files``, ``settings``); imported only by
:mod:`forcefield.cli` (and the tests). It does not import ``md``: its committee MD runs on ASE.
"""
from .config import FitConfig

__all__ = ["FitConfig", "run_fit"]


def run_fit(*args, **kwargs):
    """See :func:`forcefield.fit.loop.run_fit` (imported lazily: it pulls in torch and ASE)."""
    from .loop import run_fit as _run
    return _run(*args, **kwargs)
