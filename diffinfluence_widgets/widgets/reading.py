"""How to read a result in plain words, and which settings go together.

- :func:`sign_reading` — the sign convention said once, in the words of the chosen measurement ("helped the
  model make this" / "pulled it away"); for a higher-is-better measurement (a log-probability) the highest scores
  are the ones that pulled the query away.
- :func:`section_titles` — the titles of the highest-score and lowest-score lists.
- :func:`predicted_change_text` — the first-order prediction ``(1/N) Σ_{j∈J} s[q, j]`` of the change of the
  measurement when the listed images are removed (architecture.md, "Score sign").
- :func:`needs_generated` / :func:`compatible_settings` — Journey-TRAK and the trajectory measurements need a
  generated query (its sampling trajectory); a held-out query cannot be combined with them.
- :func:`train_labels` — class labels of training images when the backend knows them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["sign_reading", "section_titles", "predicted_change_text", "needs_generated", "compatible_settings",
           "train_labels", "measurement_words", "predicted_change", "curvature_scale", "NOISE_BELOW",
           "GENERATED_ONLY_REASON"]

#: measurements where a larger value means the model finds the query *more* likely
_HIGHER_IS_BETTER = ("trajectory_logprob",)
#: measurements and methods that need the query's sampling trajectory
_TRAJECTORY_MEASUREMENTS = ("journey_trak", "trajectory_logprob")
_TRAJECTORY_METHODS = ("journey_trak",)

GENERATED_ONLY_REASON = ("needs a generated query (it follows the sampling trajectory); "
                         "pick a generated sample to use it")


def measurement_words(measurement: str) -> str:
    """The measurement as a noun phrase ("loss", "loss at t = 500", "trajectory log-probability", …)."""
    m = measurement or ""
    if m.startswith("loss_at_t="):
        return f"loss at t = {m.split('=', 1)[1]}"
    return {"loss": "loss", "elbo_simplified": "simplified ELBO loss", "elbo": "negative ELBO",
            "square_norm": "square norm of the predicted noise", "trajectory_logprob": "trajectory log-probability",
            "journey_trak": "per-step trajectory loss"}.get(m.split("=", 1)[0], m)


def _higher_is_better(measurement: str) -> bool:
    return (measurement or "").startswith(_HIGHER_IS_BETTER)


def sign_reading(measurement: str) -> str:
    """One sentence pair: what a positive and a negative score mean for this measurement."""
    w = measurement_words(measurement)
    if _higher_is_better(measurement):
        return (f"Negative score: removing the image is predicted to lower the query's {w} — it helped the model "
                f"make this. Positive score: removing it raises the {w} — it pulled the model away.")
    if (measurement or "").startswith("square_norm"):
        return (f"Positive score: removing the image is predicted to raise the {w} (D-TRAK's proxy, not a "
                "likelihood: read it as 'most aligned'); negative: removing it lowers it.")
    return (f"Positive score: removing the image is predicted to raise the query's {w} — it helped the model "
            f"make this. Negative score: removing it lowers the {w} — it pulled the model away.")


def section_titles(measurement: str) -> tuple[str, str]:
    """Titles of the highest-score list and of the lowest-score list."""
    if _higher_is_better(measurement):
        return "Pulled it away (highest scores)", "Helped make this (lowest scores)"
    if (measurement or "").startswith("square_norm"):
        return "Highest scores", "Lowest scores"
    return "Helped make this — proponents (highest scores)", "Pulled it away — opponents (lowest scores)"


def predicted_change(result, num_train: int) -> dict[str, float]:
    """``{"proponents": (1/N) Σ s, "opponents": (1/N) Σ s}`` over the listed images (the first-order prediction
    of the change of the measurement when they are removed)."""
    if result is None or num_train <= 0:
        return {}
    return {role: float(np.sum([i.score for i in items])) / num_train
            for role, items in (("proponents", result.proponents), ("opponents", result.opponents)) if items}


def predicted_change_text(result, num_train: int) -> str:
    """:func:`predicted_change` in words (plain text)."""
    d = predicted_change(result, num_train)
    if not d:
        return ""
    w = measurement_words(result.measurement)
    n = {"proponents": len(result.proponents), "opponents": len(result.opponents)}
    parts = [f"the top {n[role]} {role}: {v:+.3g}" for role, v in d.items()]
    return (f"Predicted change of the query's {w} if these were removed — " + "; ".join(parts)
            + f" (first order: (1/N) Σ s, N = {num_train})")


def needs_generated(measurement: str | None = None, method: str | None = None) -> bool:
    """True when the measurement or method needs a generated query's sampling trajectory."""
    return bool((measurement or "").startswith(_TRAJECTORY_MEASUREMENTS) or (method or "") in _TRAJECTORY_METHODS)


def compatible_settings(session, query_id: int) -> dict:
    """Settings to change together with ``query_id`` so that the combination is valid (empty when it already is):
    a held-out query with Journey-TRAK switches to the first other method (at its default damping), with a
    trajectory measurement to the first measurement that needs none."""
    try:
        kind = session.query(query_id).kind
    except KeyError:
        return {}
    if kind == "generated":
        return {}
    fix = {}
    if needs_generated(method=session.method):
        m = next((m for m in session.backend.methods if not needs_generated(method=m)), None)
        if m is not None:
            fix.update(method=m, damping=session.default_damping(m))
    if needs_generated(measurement=session.measurement):
        m = next((m for m in session.backend.measurements if not needs_generated(measurement=m)), None)
        if m is not None:
            fix["measurement"] = m
    return fix


def train_labels(backend, ids: Sequence[int]) -> list[int | None]:
    """Class labels of the training images ``ids`` (``None`` each when the backend has none)."""
    ids = [int(i) for i in ids]
    try:
        if hasattr(backend, "train_labels"):
            return [None if v is None else int(v) for v in backend.train_labels(ids)]
        train = getattr(backend, "train", None)
        if train is not None and getattr(train, "labels", None) is not None:
            pos = train.positions(ids)
            lab = np.asarray(train.labels)[np.asarray(pos, dtype=np.int64)]
            return [int(v) for v in lab]
        labels = getattr(backend, "labels", None)  # the stand-in backend: labels in train_ids order
        if labels is not None:
            where = {int(t): n for n, t in enumerate(np.asarray(backend.train_ids))}
            return [int(labels[where[i]]) for i in ids]
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return [None] * len(ids)


#: dampings below this fraction of the curvature scale τ are marked as the noise region of the slider
NOISE_BELOW = 1e-6
_KFAC_FAMILY = ("ekfac", "kfac")


def curvature_scale(backend, method: str) -> float | None:
    """The curvature scale τ that a damping of ``method`` is compared with: the mean eigenvalue of the (E)K-FAC
    curvature for the K-FAC family, of ΦᵀΦ for the TRAK family (whose default damping is that mean). A backend may
    say it directly (``backend.curvature_scale(method)`` or a dict); ``None`` when unknown."""
    given = getattr(backend, "curvature_scale", None)
    try:
        if callable(given):
            v = given(method)
        elif isinstance(given, dict):
            v = given.get(method)
        elif method in _KFAC_FAMILY:
            v = getattr(backend, "switch_damping", None)  # IndexBackend: the mean (E)K-FAC eigenvalue
        else:
            v = (getattr(backend, "default_damping", {}) or {}).get(method)  # TRAK: relative 1 × mean eigenvalue
        v = None if v is None else float(v)
    except (TypeError, ValueError, KeyError):
        return None
    return v if v is not None and v > 0 and np.isfinite(v) else None
