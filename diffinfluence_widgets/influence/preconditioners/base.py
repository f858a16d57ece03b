"""The :class:`Preconditioner` protocol: how a method turns a query gradient into the feature searched in a store.

Every method scores ``s[q, j] = ⟨feature_λ(q), φ_j⟩`` against one array ``φ`` of a projected-gradient store, where
the training side never depends on λ, the measurement or the query. A preconditioner therefore does two things:

* :meth:`~Preconditioner.rotate` the query gradient **once** (the slow, λ-independent part), and
* give its :meth:`~Preconditioner.feature` at **any** λ (cheap: a division in an eigenbasis and a projection),

and names the store (:attr:`~Preconditioner.store`, by its training measurement) and the array in it
(:meth:`~Preconditioner.array`) that the feature is searched against, its :attr:`~Preconditioner.default_damping`
and whether exact rescoring with full training gradients is defined (:attr:`~Preconditioner.exact`).
:class:`PreconditionerBase` supplies the one damping check (:func:`~diffinfluence_widgets.config.check_damping`)
in front of every feature, so no method checks λ its own way.

A new method is one file with a subclass and one line in the registry
(:data:`diffinfluence_widgets.influence.preconditioners.PRECONDITIONERS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from ...config import Method, StoreSpace, check_damping, relative_damping

__all__ = ["Preconditioner", "PreconditionerBase", "PreconditionerContext"]

Layers = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PreconditionerContext:
    """What a preconditioner may be built from: the fitted curvature, the store's projection and settings, and
    ``store(measurement)``, which opens (or builds) the projected-gradient store of that training measurement."""

    method: Method
    curvature: Any
    projector: Any
    store: Callable[[str], Any]
    space: StoreSpace
    whiten_damping: float
    switch_damping: float | None
    query_dtype: torch.dtype


@runtime_checkable
class Preconditioner(Protocol):
    """What the projected backend needs from a method."""

    #: the method's name (a :class:`~diffinfluence_widgets.config.Method`)
    method: str
    #: training measurement of the store searched (``"loss"`` or ``"square_norm"``)
    store: str
    #: λ used when the user has not chosen one (not comparable across families)
    default_damping: float
    #: the curvature's scale τ (mean eigenvalue of the (E)K-FAC matrix or of ΦᵀΦ); λ = rel · τ is the relative rule
    damping_scale: float
    #: True when :meth:`exact_scores` is defined (rescoring with full training gradients)
    exact: bool

    def query_measurement(self, measurement: str) -> str:
        """The measurement actually differentiated on the query side for the chosen one."""

    def rotate(self, layers: Layers) -> Any:
        """Once per query: ``layers`` ``{name: [R, d_out, d_in+1]}`` float64 (row 0 the whole, then band parts)."""

    def array(self, damping: float) -> str:
        """The name of the store array searched at λ."""

    def feature(self, rotated: Any, damping: float, all_rows: bool = False) -> np.ndarray:
        """``[1, dim]`` (``[R, dim]`` with ``all_rows``) float64 query feature at λ for :meth:`array`."""


class PreconditionerBase:
    """Defaults for :class:`Preconditioner` and the damping check in front of every feature."""

    method: str = ""
    store: str = "loss"
    default_damping: float = 1.0
    damping_scale: float = 1.0
    exact: bool = False
    #: key under which the backend caches :meth:`train_side` vectors (shared by methods with the same train side)
    train_key: str = ""

    def query_measurement(self, measurement: str) -> str:
        return measurement

    def array(self, damping: float) -> str:
        return "features"

    def relative_damping(self, relative: float) -> float:
        """The absolute λ = ``relative`` · :attr:`damping_scale` (the rule of
        :func:`~diffinfluence_widgets.config.relative_damping`)."""
        return relative_damping(relative, self.damping_scale)

    def feature(self, rotated: Any, damping: float, all_rows: bool = False) -> np.ndarray:
        return self._feature(rotated, check_damping(damping), all_rows)

    def _feature(self, rotated: Any, damping: float, all_rows: bool) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_side(self, layers: Layers) -> dict[str, torch.Tensor]:  # pragma: no cover - only when exact
        """Full training-side vectors ``{name: [B, d_out, d_in+1]}`` for :meth:`exact_scores` (cached)."""
        raise NotImplementedError(f"method {self.method!r} has no exact rescoring")

    def exact_scores(self, rotated: Any, damping: float, train: list[Mapping[str, torch.Tensor]]) -> np.ndarray:
        """Scores of the given training examples with full (unprojected) gradients."""
        check_damping(damping)
        raise NotImplementedError(f"method {self.method!r} has no exact rescoring")
