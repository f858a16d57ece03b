"""Shared names and settings: the enums of the method's choices, the one damping rule, and frozen config objects.

Every layer imports its method names, approximation / Fisher choices, store spaces and index kinds from here, so a
name is spelled once. The enums are ``str`` subclasses: ``Method.EKFAC == "ekfac"``, and plain strings keep working
wherever a member is expected (:func:`choice` turns them into members, with an error naming the value).

The damping rule (:func:`check_damping`) is the only check of a damping λ anywhere: the curvature, the TRAK scorer,
the preconditioners, the backend and the session all call it, so λ = 0, negative, NaN and ∞ are refused alike.
:func:`relative_damping` states λ relative to the curvature's scale τ (its mean eigenvalue): λ = rel · τ. Unlike an
absolute λ, a relative one means the same thing for every model, loss scale and image size: multiplying the loss
by c multiplies G, τ and the gradients by c, so with λ = rel · τ every score is multiplied by c (rankings unchanged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Mapping, TypeVar

try:  # Python ≥ 3.11
    from enum import StrEnum
except ImportError:  # Python 3.10: the same behaviour for our purposes
    class StrEnum(str, Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)

__all__ = ["StrEnum", "Method", "Approximation", "Fisher", "StoreSpace", "IndexKind", "choice", "check_damping",
           "relative_damping", "DEFAULT_KFAC_DAMPING", "DEFAULT_QUERY_DRAWS", "DEFAULT_TRAIN_DRAWS",
           "DEFAULT_RELATIVE_DAMPING", "DEFAULT_ENSEMBLE", "DEFAULT_METHODS", "KFAC_METHODS", "TRAK_METHODS",
           "StoreConfig", "IndexConfig"]


class Method(StrEnum):
    """Influence methods (preconditioners) the projected backend offers."""

    EKFAC = "ekfac"
    KFAC = "kfac"
    TRAK = "trak"
    DTRAK = "dtrak"
    JOURNEY_TRAK = "journey_trak"
    IDENTITY = "identity"


class Approximation(StrEnum):
    """How K-FAC treats the weight sharing over pixels and draws (``kfac_approx``)."""

    #: A = Σ a aᵀ over examples and shared positions (recommended)
    EXPAND = "expand"
    #: A from the mean input and B from the summed output gradient over shared positions
    REDUCE = "reduce"


class Fisher(StrEnum):
    """Which GGN the K-FAC factors approximate."""

    MODEL = "model"  # GGN^model, a Monte-Carlo Fisher (recommended)
    EMPIRICAL = "empirical"  # GGN^loss, what TRAK implicitly uses (ablation)
    EXACT = "exact"  # GGN^model with H's square root backpropagated column by column


class StoreSpace(StrEnum):
    """Coordinates of a store's K-FAC array: plain projected gradients, or whitened in the eigenbasis."""

    PARAMETER, EIGEN = "parameter", "eigen"


class IndexKind(StrEnum):
    """FAISS index kinds (``auto``: exact flat search up to :attr:`IndexConfig.auto_flat_max` examples, ``pca`` above:
    a PCA-reduced 8-bit scan with exact re-ranking, see :class:`~diffinfluence_widgets.index.FeatureIndex`)."""

    AUTO = "auto"
    FLAT = "flat"
    PCA = "pca"
    IVF = "ivf"
    HNSW = "hnsw"


#: the K-FAC family (their dampings are comparable) and the TRAK family (λ relative to ΦᵀΦ)
KFAC_METHODS = (Method.EKFAC, Method.KFAC)
TRAK_METHODS = (Method.TRAK, Method.DTRAK, Method.JOURNEY_TRAK)
#: the methods a backend offers unless told otherwise (identity is opt-in: a baseline)
DEFAULT_METHODS = (Method.EKFAC, Method.KFAC, Method.TRAK, Method.DTRAK, Method.JOURNEY_TRAK)
#: paper default λ for the K-FAC family (relative to the GGN of the per-pixel-mean, per-example-mean loss)
DEFAULT_KFAC_DAMPING = 1e-8

#: (t, ε) draws per gradient in the recommended default, query side and training side (issue 14, chosen on the
#: digits benchmark, 8×8 ``--quick`` preset: EK-FAC LDS 20 % at 32 / 32 draws, 37 % at 512 / 128; a query
#: gradient's Monte-Carlo noise does not average out over the removed training examples, so the query side needs
#: more; 256 training draws added nothing). Gradients of the paper's code used fewer; pass ``num_draws`` to choose.
DEFAULT_QUERY_DRAWS = 512
DEFAULT_TRAIN_DRAWS = 128
#: the recommended default damping of the researcher's API (``evaluation.attribute`` / ``evaluate``), stated
#: relative to the curvature's mean eigenvalue τ (λ = rel · τ, :func:`relative_damping`): an absolute λ means
#: something else for every model, loss scale and image size. Chosen on the issue-14 runs (``bench/RESULTS.md``):
#: on 8×8 digits LDS is flat for rel = 1e-6 … 1e-1; on 16×16 digits the 3-model ensemble's LDS falls as λ grows
#: (36.9 / 36.7 / 35.3 / 31.2 % at 1e-4 / 1e-3 / 1e-2 / 1e-1); 1e-3 is the largest (most stable) value within a
#: point of the best; on validation queries that no reported number uses (``EvaluationSettings.query_sample_seed``)
#: it is within 0.3 pp of the best grid point on 8×8 digits, 16×16 digits and shapes. The explorer's K-FAC-family
#: slider starts there too. The paper's absolute 1e-8 stays ``damping="absolute", dampings=(1e-8,)``.
DEFAULT_RELATIVE_DAMPING = 1e-3
#: independently trained full-data models whose score matrices the recommended default averages (issue 14;
#: ``evaluation.train_ensemble``): each model's seed-specific idiosyncrasies and gradient noise average out
DEFAULT_ENSEMBLE = 3

E = TypeVar("E", bound=Enum)


def choice(enum: type[E], value: Any, what: str) -> E:
    """``enum(value)``, or a ``ValueError`` naming ``what``, the value and the allowed ones."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{what}={value!r} is not one of {[m.value for m in enum]}") from None


def check_damping(damping: Any) -> float:
    """The damping rule: ``float(damping)`` when it is a finite number > 0; otherwise a ``ValueError`` (a
    ``TypeError`` for a non-number) naming the value."""
    try:
        lam = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a positive finite number, got {damping!r}") from None
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"damping must be a positive finite number (λ > 0), got {damping!r}")
    return lam


def relative_damping(relative: Any, scale: Any) -> float:
    """The relative damping rule: ``λ = relative · scale``, ``scale`` the curvature's mean eigenvalue τ.

    Both must be finite and > 0 (a ``ValueError`` naming the bad one); the product passes :func:`check_damping`.
    """
    for what, v in (("relative damping", relative), ("curvature scale τ (mean eigenvalue)", scale)):
        try:
            ok = math.isfinite(float(v)) and float(v) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{what} must be a positive finite number, got {v!r}")
    return check_damping(float(relative) * float(scale))


def _positive_int(owner: str, name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{owner}.{name} must be an integer ≥ {minimum}, got {v!r}")


@dataclass(frozen=True)
class StoreConfig:
    """What goes into a projected-gradient store (the training side; changing any of it means a new store)."""

    k: int = 4096
    k_b: int | None = None
    k_a: int | None = None
    structure: str = "kronecker"
    projection_kind: str = "rademacher"
    projection_seed: int = 0
    space: StoreSpace = StoreSpace.EIGEN
    whiten_damping: float | None = None
    num_draws: int = DEFAULT_TRAIN_DRAWS
    draw_seed: int = 0
    shard_size: int = 256
    batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", choice(StoreSpace, self.space, "space"))
        for n in ("k", "num_draws", "shard_size", "batch_size"):
            _positive_int("StoreConfig", n, getattr(self, n))
        for n in ("k_b", "k_a"):
            if getattr(self, n) is not None:
                _positive_int("StoreConfig", n, getattr(self, n))
        if self.whiten_damping is not None:
            object.__setattr__(self, "whiten_damping", check_damping(self.whiten_damping))

    @property
    def reference_damping(self) -> float:
        """λ₀ of the whitened (eigen) array."""
        return DEFAULT_KFAC_DAMPING if self.whiten_damping is None else self.whiten_damping


@dataclass(frozen=True)
class IndexConfig:
    """The query / search side of the projected backend (changing it never rebuilds a store)."""

    methods: tuple[Method, ...] = DEFAULT_METHODS
    measurements: tuple[str, ...] | None = None
    index_kind: IndexKind = IndexKind.AUTO
    rescore_candidates: int = 0
    query_num_draws: int = DEFAULT_QUERY_DRAWS
    num_generated: int = 8
    num_bands: int = 4
    switch_damping: float | str | None = "auto"
    auto_flat_max: int = 50_000
    #: keep the rotated full training gradients on disk for exact refined answers ("auto": when they fit
    #: ``exact_max_bytes``); ``exact_dtype`` "float32" or "float64"; ``refine_bins``: damping-profile bins
    exact_store: bool | str = "auto"
    exact_dtype: str = "float32"
    exact_max_bytes: int = 4 << 30
    refine_bins: int = 1024
    #: with an exact store, also keep its 8-bit copy for the instant first answer of a new query (an 8-bit scan
    #: of every training image instead of the FAISS search; 1 byte per curvature parameter per image on disk)
    instant_scan: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.methods, (str, bytes)) or not len(self.methods):
            raise ValueError(f"IndexConfig.methods must be a non-empty sequence of method names, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(choice(Method, m, "method") for m in self.methods))
        if self.measurements is not None:
            object.__setattr__(self, "measurements", tuple(str(m) for m in self.measurements))
        object.__setattr__(self, "index_kind", choice(IndexKind, self.index_kind, "index_kind"))
        for n, lo in (("rescore_candidates", 0), ("query_num_draws", 1), ("num_generated", 0), ("num_bands", 0),
                      ("auto_flat_max", 1)):
            _positive_int("IndexConfig", n, getattr(self, n), lo)
        if self.switch_damping not in (None, "auto"):
            object.__setattr__(self, "switch_damping", check_damping(self.switch_damping))
        if self.exact_store not in (True, False, "auto"):
            raise ValueError(f"IndexConfig.exact_store must be True, False or 'auto', got {self.exact_store!r}")
        if self.exact_dtype not in ("float32", "float64"):
            raise ValueError(f"IndexConfig.exact_dtype must be 'float32' or 'float64', got {self.exact_dtype!r}")
        _positive_int("IndexConfig", "exact_max_bytes", self.exact_max_bytes, 0)
        _positive_int("IndexConfig", "refine_bins", self.refine_bins, 2)
        if not isinstance(self.instant_scan, bool):
            raise ValueError(f"IndexConfig.instant_scan must be True or False, got {self.instant_scan!r}")


def split_settings(settings: Mapping[str, Any], *configs: type) -> list[dict[str, Any]]:
    """Route keyword settings to the config classes that own them; an unknown name is a ``TypeError``."""
    out: list[dict[str, Any]] = [{} for _ in configs]
    owners = {f.name: i for i, c in reversed(list(enumerate(configs))) for f in fields(c)}
    for name, v in settings.items():
        if name not in owners:
            raise TypeError(f"unknown setting {name!r}; expected one of {sorted(owners)}")
        out[owners[name]][name] = v
    return out
