"""The grid every embedding and profile sits on, so that cosines are exact."""

from __future__ import annotations

import numpy as np

# Embeddings and profiles sit on a grid of 2^-16 (far finer than any ranking needs) and are held in
# float64. A product of two grid values is a multiple of 2^-32, and float64 holds any sum of up to 2^21
# such products exactly. So every cosine is exact: the same bits whatever BLAS kernel, block size or row
# placement computes it, and batch, serving and two processes agree to the last bit.
GRID = 2.0**16


def on_grid(matrix: np.ndarray) -> np.ndarray:
    """`matrix` (rows of norm <= 1) rounded to the grid, as float64: what every cosine multiplies."""
    return np.round(np.asarray(matrix, dtype=np.float64) * GRID) / GRID
