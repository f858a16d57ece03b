"""``Controls``: method, measurement proxy, damping (log-scale live slider), timestep band, k (ipywidgets)."""
from __future__ import annotations

import html
import math
import time

import ipywidgets as W
import traitlets

from ..session import AttributionSession
from .reading import GENERATED_ONLY_REASON, NOISE_BELOW, curvature_scale, needs_generated

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

#: decades of damping shown below the noise boundary (or the default) and above the curvature scale (or default)
DECADES_BELOW, DECADES_ABOVE = 1, 2
#: seconds during which a slider value near one Python pushed is taken for the front end's late echo of that push
#: (the front end re-snaps its value to the step grid whenever it applies a value or a range, and answers with it;
#: that answer can reach the kernel after the session has moved on, e.g. from Journey-TRAK's λ to EK-FAC's)
ECHO_WINDOW_S = 5.0


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
        style = {"description_width": "100px"}
        lay = W.Layout(width="372px")
        self.method = W.Dropdown(options=[(_label(m, METHOD_HELP), m) for m in b.methods], value=session.method,
                                 description="method", style=style, layout=lay,
                                 tooltip="Influence method (damping values are not comparable across families)")
        self.measurement = W.Dropdown(options=[(_label(m, MEASUREMENT_HELP), m) for m in b.measurements],
                                      value=session.measurement, description="measurement", style=style, layout=lay,
                                      tooltip="The measurement of the query whose change the scores predict")
        lo, hi = self._range()
        self.damping = W.FloatLogSlider(value=session.damping, base=10, min=lo, max=hi, step=0.05,
                                        description="damping λ", readout=False, continuous_update=True,
                                        style=style, layout=W.Layout(width="400px"),
                                        tooltip="Damping λ of (G + λI)⁻¹ — log scale, updates live")
        #: the session's λ itself (the slider's own readout would show its 0.05-decade grid point, e.g. 3.98e-6
        #: for a default of 4.05e-6 on the tiny demo, disagreeing with the gallery)
        self.damping_value = W.HTML(layout=W.Layout(width="72px"))
        self.damping_value.add_class("dinf-damping-value")
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
        #: (time, value) of each λ Python pushed to the slider within ECHO_WINDOW_S, newest last
        self._pushed: list[tuple[float, float]] = [(time.monotonic(), session.damping)]
        self.method.observe(self._ui("method"), "value")
        self.measurement.observe(self._ui("measurement"), "value")
        self.damping.observe(self._ui("damping"), "value")
        self.band.observe(self._ui("band"), "value")
        self.k.observe(self._ui("k"), "value")
        self.reset_damping.on_click(lambda _: setattr(self.session, "damping", self.session.default_damping()))
        session.observe(self._from_session, ["method", "measurement", "damping", "band", "k"])
        #: why some choices are not offered right now ("" when all are)
        self.note = W.HTML()
        self.note.add_class("dinf-controls-note")
        session.observe(self._availability, ["query_id", "queries", "method", "measurement"])
        #: where λ sits relative to the curvature scale τ, with the noise region (λ < 1e-6 τ) marked
        self.scale = W.HTML()
        self.scale.add_class("dinf-damping-scale")
        super().__init__([self.method, self.measurement,
                          W.HBox([self.damping, self.damping_value, self.reset_damping]), self.scale,
                          self.band, self.k, self.note], **kwargs)
        self._draw_scale()
        self.add_class("dinf-controls")
        self._availability()

    def _availability(self, change=None) -> None:
        """Offer only the methods and measurements that work with the current query: Journey-TRAK and the
        trajectory measurements need a generated query (a held-out image has no sampling trajectory)."""
        s, b = self.session, self.session.backend
        try:
            generated = s.query_id is not None and s.query().kind == "generated"
        except KeyError:
            generated = False
        methods = [m for m in b.methods if generated or not needs_generated(method=m)]
        measurements = [m for m in b.measurements if generated or not needs_generated(measurement=m)]
        self._syncing = True
        try:
            for dd, names, table, current in ((self.method, methods, METHOD_HELP, s.method),
                                               (self.measurement, measurements, MEASUREMENT_HELP, s.measurement)):
                opts = tuple((_label(m, table), m) for m in (names if current in names else [*names, current]))
                if tuple(dd.options) != opts:
                    dd.options = opts
                dd.value = current
        finally:
            self._syncing = False
        hidden = [_label(m, METHOD_HELP) for m in b.methods if m not in methods] + \
                 [_label(m, MEASUREMENT_HELP) for m in b.measurements if m not in measurements]
        self.note.value = ("" if not hidden else
                           f"<small class='dinf-unavailable' title='{html.escape(', '.join(hidden), quote=True)}'>"
                           f"Journey-TRAK and the trajectory measurements are not offered for a held-out query: "
                           f"each {GENERATED_ONLY_REASON}.</small>")

    def _range(self, method: str | None = None) -> tuple[float, float]:
        """The slider's range (log10) for ``method``: from a decade below the noise boundary (1e-6 τ) to two
        above the curvature scale τ, always including the method's default and the current damping. (Bounds are
        changed in their own message before the value: see :meth:`_set_range`.)"""
        s = self.session
        method = method or s.method
        d = s.default_damping(method)
        tau = curvature_scale(s.backend, method)
        lows, highs = [math.log10(d)], [math.log10(d)]
        if tau is not None:
            lows.append(math.log10(NOISE_BELOW * tau))
            highs.append(math.log10(tau))
        if method == s.method:
            lows.append(math.log10(s.damping))
            highs.append(math.log10(s.damping))
        return math.floor(min(lows)) - DECADES_BELOW, math.ceil(max(highs)) + DECADES_ABOVE

    def _draw_scale(self) -> None:
        """A strip under the slider: the noise region hatched, τ marked, and λ in units of τ."""
        s = self.session
        lo, hi = self.damping.min, self.damping.max
        tau = curvature_scale(s.backend, s.method)
        lam = f"λ = {s.damping:.2e}"
        self.damping_value.value = f"<span title='λ = {s.damping!r}'>{s.damping:.3g}</span>"
        if tau is None:
            self.scale.value = f"<div class='dinf-scale-text'>{lam}</div>"
            return
        frac = lambda v: 100 * min(1.0, max(0.0, (math.log10(v) - lo) / (hi - lo)))  # noqa: E731
        noise, mark = frac(NOISE_BELOW * tau), frac(tau)
        in_noise = s.damping < NOISE_BELOW * tau
        words = (f"{lam} = {s.damping / tau:.1e} τ (τ = {tau:.2e}, the curvature's mean eigenvalue) — "
                 + ("<b class='dinf-noise-warning'>in the noise region: the smallest, least determined curvature "
                    "directions dominate; rankings here are unstable</b>" if in_noise else
                    "hatched: the noise region, λ &lt; 1e-6 τ"))
        self.scale.value = (
            f"<div class='dinf-scale' data-noise-below='{NOISE_BELOW * tau!r}' data-in-noise='{int(in_noise)}'>"
            f"<div class='dinf-scale-bar'><span class='dinf-scale-noise' style='width:{noise:.1f}%'></span>"
            f"<span class='dinf-scale-tau' style='left:{mark:.1f}%' title='τ'></span></div>"
            f"<div class='dinf-scale-text'>{words}</div></div>")

    def _ui(self, name: str):
        def handler(change):
            if self._syncing:
                return
            if name == "method":
                # λ is not comparable across method families: the new method's range and default damping
                new = change["new"]
                self._set_range(*self._range_for_switch(new))
                self.session.update(method=new, damping=self.session.default_damping(new))
            else:
                if name == "damping" and self._is_echo(change["new"]):
                    return
                try:
                    setattr(self.session, name, _band_value(change["new"]) if name == "band" else change["new"])
                except traitlets.TraitError:
                    self._from_session()
        return handler

    def _is_echo(self, value: float) -> bool:
        """Whether a slider value from the front end is its echo of a λ that Python pushed, not a user's drag.

        The front end snaps every value it is given (and its value whenever the range changes) to the slider's
        0.05-decade grid and sends the snapped value back. An echo of the session's current λ is ignored; an echo
        of an earlier push (it can arrive after the session has moved on) also puts the session's λ back on the
        slider. A user's drag within ECHO_WINDOW_S to the grid point of an earlier push is taken for an echo too."""
        step = self.damping.step
        if _within_half_step(value, self.session.damping, step):
            return True
        if not any(_within_half_step(value, v, step) for v in self._recent_pushes()):
            return False
        self._push(self.session.damping)
        return True

    def _recent_pushes(self) -> list[float]:
        """The λ values pushed within ECHO_WINDOW_S (older ones are forgotten)."""
        now = time.monotonic()
        self._pushed = [(t, v) for t, v in self._pushed if now - t <= ECHO_WINDOW_S]
        return [v for _, v in self._pushed]

    def _push(self, value: float) -> None:
        """Set the slider to ``value`` (from Python, not a user change) and remember it for :meth:`_is_echo`."""
        self._recent_pushes()  # forget the expired pushes
        self._pushed.append((time.monotonic(), value))
        syncing, self._syncing = self._syncing, True
        try:
            self.damping.value = value
        finally:
            self._syncing = syncing

    def _range_for_switch(self, method: str) -> tuple[float, float]:
        """The new method's range, kept wide enough for the current value until the session moves it."""
        lo, hi = self._range(method)
        cur = math.log10(self.session.damping)
        return min(lo, math.floor(cur)), max(hi, math.ceil(cur))

    def _set_range(self, lo: float, hi: float) -> None:
        # bounds first, in their own message, then the value: never a value outside the front end's range
        self._syncing = True
        try:
            with self.damping.hold_sync():
                self.damping.min, self.damping.max = lo, hi
            self._push(self.session.damping)
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
                self._push(s.damping)
            self.band.value = _band_key(s.band)
            self.k.value = s.k
        finally:
            self._syncing = False
        rng = self._range()  # the method's own range, plus the current value
        if (self.damping.min, self.damping.max) != rng:
            self._set_range(*rng)
        self._draw_scale()


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
