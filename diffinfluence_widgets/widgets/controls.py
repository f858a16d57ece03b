"""``Controls``: method, measurement proxy, damping (log-scale live slider), timestep band, k (ipywidgets)."""
from __future__ import annotations

import math

import ipywidgets as W
import traitlets

from ..session import AttributionSession

__all__ = ["Controls", "MEASUREMENT_HELP", "METHOD_HELP"]

MEASUREMENT_HELP = {
    "loss": "loss — diffusion training loss of the query (recommended)",
    "elbo_simplified": "ELBO* — simplified ELBO, weighted loss",
    "elbo": "ELBO — full variational bound",
    "square_norm": "square norm (D-TRAK) — loss with zero targets",
    "trajectory_logprob": "sampling-trajectory log-probability",
    "journey_trak": "Journey-TRAK per-step loss (generated queries)",
}
METHOD_HELP = {
    "ekfac": "EK-FAC influence (paper)",
    "kfac": "K-FAC influence",
    "trak": "TRAK (projected, GGN of the loss)",
    "dtrak": "D-TRAK (square-norm gradients)",
    "journey_trak": "Journey-TRAK (generated queries)",
    "identity": "gradient dot product (no curvature)",
    "similarity": "pixel similarity baseline",
}

#: decades of damping shown either side of a method's default
DECADES_BELOW, DECADES_ABOVE = 6, 4


def _label(name: str, table: dict[str, str]) -> str:
    if name in table:
        return table[name]
    if name.startswith("loss_at_t="):
        return f"loss at t = {name.split('=', 1)[1]}"
    return name


class Controls(W.VBox):
    """Two-way bound to an :class:`AttributionSession`. The damping slider updates live while dragged."""

    def __init__(self, session: AttributionSession, **kwargs):
        self.session = session
        b = session.backend
        style = {"description_width": "88px"}
        lay = W.Layout(width="360px")
        self.method = W.Dropdown(options=[(_label(m, METHOD_HELP), m) for m in b.methods], value=session.method,
                                 description="method", style=style, layout=lay,
                                 tooltip="Influence method (damping values are not comparable across families)")
        self.measurement = W.Dropdown(options=[(_label(m, MEASUREMENT_HELP), m) for m in b.measurements],
                                      value=session.measurement, description="measurement", style=style, layout=lay,
                                      tooltip="The measurement of the query whose change the scores predict")
        lo, hi = self._range()
        self.damping = W.FloatLogSlider(value=session.damping, base=10, min=lo, max=hi, step=0.05,
                                        description="damping λ", readout_format=".2e", continuous_update=True,
                                        style=style, layout=W.Layout(width="460px"),
                                        tooltip="Damping λ of (G + λI)⁻¹ — log scale, updates live")
        self.reset_damping = W.Button(description="default λ", layout=W.Layout(width="90px"),
                                      tooltip="Reset the damping to this method's default")
        bands = list(getattr(b, "bands", []))
        # option values are strings: a None value would read as "nothing selected" in ipywidgets
        self.band = W.Dropdown(options=[("all timesteps", "all")] + [(f"t ∈ [{lo_}, {hi_})", f"{lo_}-{hi_}")
                                                                     for lo_, hi_ in bands],
                               value=_band_key(session.band), description="timesteps", style=style, layout=lay,
                               disabled=not bands,
                               tooltip="Restrict the query measurement to one timestep band")
        self.k = W.BoundedIntText(value=session.k, min=1, max=min(200, len(b.train_ids)), description="k",
                                  style=style, layout=W.Layout(width="170px"),
                                  tooltip="How many proponents and opponents to list")
        for w, cls in ((self.method, "dinf-method"), (self.measurement, "dinf-measurement"),
                       (self.damping, "dinf-damping"), (self.band, "dinf-band"), (self.k, "dinf-k"),
                       (self.reset_damping, "dinf-reset-damping")):
            w.add_class(cls)
        self._syncing = False
        self.method.observe(self._ui("method"), "value")
        self.measurement.observe(self._ui("measurement"), "value")
        self.damping.observe(self._ui("damping"), "value")
        self.band.observe(self._ui("band"), "value")
        self.k.observe(self._ui("k"), "value")
        self.reset_damping.on_click(lambda _: setattr(self.session, "damping", self.session.default_damping()))
        session.observe(self._from_session, ["method", "measurement", "damping", "band", "k"])
        super().__init__([self.method, self.measurement, W.HBox([self.damping, self.reset_damping]), self.band,
                          self.k], **kwargs)
        self.add_class("dinf-controls")

    def _range(self) -> tuple[float, float]:
        """One fixed range (log10) covering every method family's default: changing the range together with the
        value lets the front end clamp the value to the old range and send the clamped value back."""
        logs = [math.log10(self.session.default_damping(m)) for m in self.session.backend.methods]
        logs.append(math.log10(self.session.damping))
        return math.floor(min(logs)) - DECADES_BELOW, math.ceil(max(logs)) + DECADES_ABOVE

    def _ui(self, name: str):
        def handler(change):
            if self._syncing:
                return
            if name == "method":
                # λ is not comparable across method families: switch to the new method's default damping
                self.session.update(method=change["new"], damping=self.session.default_damping(change["new"]))
            else:
                if name == "damping" and _within_half_step(change["new"], self.session.damping, self.damping.step):
                    # the front end snapped our value to its step grid and echoed it back: not a user change
                    return
                try:
                    setattr(self.session, name, _band_value(change["new"]) if name == "band" else change["new"])
                except traitlets.TraitError:
                    self._from_session()
        return handler

    def _set_range(self, lo: float, hi: float) -> None:
        # bounds first, in their own message, then the value: never a value outside the front end's range
        self._syncing = True
        try:
            with self.damping.hold_sync():
                self.damping.min, self.damping.max = lo, hi
            self.damping.value = self.session.damping
        finally:
            self._syncing = False

    def _from_session(self, change=None) -> None:
        s = self.session
        self._syncing = True
        try:
            self.method.value = s.method
            self.measurement.value = s.measurement
            lg = math.log10(s.damping)
            if not self.damping.min <= lg <= self.damping.max:
                self._syncing = False
                self._set_range(min(self.damping.min, math.floor(lg)), max(self.damping.max, math.ceil(lg)))
                self._syncing = True
            if not math.isclose(self.damping.value, s.damping, rel_tol=1e-12):
                self.damping.value = s.damping
            self.band.value = _band_key(s.band)
            self.k.value = s.k
        finally:
            self._syncing = False


def _band_key(band) -> str:
    return "all" if band is None else f"{int(band[0])}-{int(band[1])}"


def _band_value(key: str):
    if key == "all":
        return None
    lo, hi = key.split("-")
    return (int(lo), int(hi))


def _within_half_step(a: float, b: float, step: float) -> bool:
    try:
        return abs(math.log10(a) - math.log10(b)) <= step / 2 + 1e-9
    except ValueError:
        return False
