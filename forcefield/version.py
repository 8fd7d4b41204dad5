"""The version of oreo (one place; the package, model files and exports record it)."""
__version__ = "0.1.0"
