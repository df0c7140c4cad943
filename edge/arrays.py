"""`Array`: a numpy array of any dtype and shape, for signatures in modules type-checked without `Any`
(numpy spells the shape parameter of `np.ndarray` as `Any`, so the alias lives here, outside them)."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

Array: TypeAlias = NDArray[np.generic]
