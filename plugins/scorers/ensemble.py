"""``ensemble``: a weighted, per-scorer-normalized combination of registered scorers.

Options: ``scorers`` as ``{"name": weight}`` or ``"name:weight,name:weight"``, ``normalization``
(``zscore``, ``minmax`` or ``none``) and ``options`` (``{"name": {option: value}}`` for each part).
See :class:`tao_core.scoring.Ensemble`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tao_core.scoring import Ensemble, Normalization


def make_ensemble(scorers: Mapping[str, float] | str, normalization: Normalization = "zscore",
                  options: Mapping[str, Mapping[str, Any]] | None = None) -> Ensemble:
    return Ensemble.from_names(scorers, normalization, options)


SCORERS = {"ensemble": make_ensemble}
