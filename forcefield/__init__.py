"""oreo: an equivariant machine-learning force field for molecules and polymers.

Quick use::

    from forcefield import OreoCalculator
    atoms.calc = OreoCalculator("aspirin.pt")
"""
__version__ = "0.1.0"

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
