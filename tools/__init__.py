"""Maintainer tooling, outside the runtime package: Colab stamping (``python tasks.py colab``), the course's
time budget from FLOP counts, and rendering every stored table and verdict for a before/after diff."""
