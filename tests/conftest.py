"""Test configuration: point OREO_DATA_DIR at the reference data beside the clone.

The reference data lives in ``<clone>/../shared/data``; an OREO_DATA_DIR already set in the
environment wins.
"""
import os
from pathlib import Path

if not os.environ.get("OREO_DATA_DIR"):
    os.environ["OREO_DATA_DIR"] = str(Path(__file__).resolve().parents[2] / "shared" / "data")
