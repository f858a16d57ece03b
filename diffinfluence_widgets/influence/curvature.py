"""K-FAC and EK-FAC approximations of the GGN of a diffusion model, with exact damping (method §4).

The curvature is the generalised Gauss-Newton matrix of the training loss ``L = (1/N) Σ_n E_{t,ε} ℓ_t``. Every
(x_n, t, ε) draw is one data point, and the expectations over draws go **inside** each Kronecker factor. Per
tracked layer (bias folded into the input, see :mod:`.capture`), with ``a`` the layer input and ``b`` the
backpropagated output-space vector at each of the R weight-sharing positions:

* ``kfac_approx="expand"`` (recommended): ``A = Σ_{n,r} a aᵀ / (N R)``, ``B = Σ_{n,r} b bᵀ / N``
  (B is **not** divided by R — the K-FAC-expand definition, method trap 10).
* ``kfac_approx="reduce"``: ``ā = mean_r a``, ``b̄ = Σ_r b``; ``A = Σ_n ā āᵀ / N``, ``B = Σ_n b̄ b̄ᵀ / N``.

``b`` is the gradient w.r.t. the layer output of one of these objectives (D = pixels per image, the loss is the
**mean** over pixels so its output-space Hessian is ``H = (2/D) I``):

* ``fisher="model"`` — GGN^model (recommended), an MC Fisher: backpropagate ``√(2/D) z`` with ``z ~ N(0, I)``
  seeded per draw. This is the gradient of the mean-over-pixels squared error at a target sampled from
  ``N(ε_θ, (D/2) I)`` — i.e. σ² = ½ in the sum-over-pixels convention rescaled to the mean — so
  ``E[b bᵀ] = Jᵀ H J`` exactly. One MC sample per draw, as in the paper. Independent of the targets ε.
* ``fisher="empirical"`` — GGN^loss (ablation; what TRAK implicitly uses): the gradient of the per-draw loss with
  the true targets.
* ``fisher="exact"`` — GGN^model with H's square root backpropagated column by column (D backward passes per draw):
  the exact factors, for tests and small problems.

``method="ekfac"`` keeps the K-FAC eigenbases and replaces the eigenvalues by ``Λ_ij = E_n[(Q_Bᵀ G_n Q_A)_ij²]``
with ``G_n`` the per-draw weight gradient of the same objective (a second pass over the data).

Damping is exact in the eigenbasis: ``(G + λI)⁻¹ v = Q (Q^T v / (Λ + λ))``. The stored eigenvalues are never
modified (method trap 8), so a new λ is one elementwise division — no refit. λ is relative to the GGN of the
per-example-mean, per-pixel-mean loss above (paper default 1e-8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import (CorruptArtifactError, atomic_write_json, load_safetensors, remove_stale_temporaries,
                   save_safetensors)
from ..config import DEFAULT_KFAC_DAMPING, KFAC_METHODS, Approximation, Fisher, check_damping, choice
from ..diffusion.draws import draw_noise, example_generator
from ..diffusion.model import DiffusionModel, resolve_device
from ..distributed import all_reduce_sum_, rank_and_world, shard_slice
from .artifacts import load_fit_checkpoint, read_manifest, save_fit_checkpoint
from .capture import CallRecord, LayerCapture, frozen_eval, layer_shape, tracked_layers
from .gradients import LayerGradients
from .wgrad import add_input_covariance_

__all__ = ["Curvature", "fit_curvature", "read_manifest", "fit_factors", "FactorProblem", "check_damping", "METHODS",
           "KFAC_APPROXES", "FISHER_TYPES", "DEFAULT_CURVATURE_DRAWS", "DEFAULT_DAMPING"]

#: the K-FAC family, its approximations and Fisher types (the names live in :mod:`diffinfluence_widgets.config`)
METHODS = tuple(m.value for m in KFAC_METHODS)
KFAC_APPROXES = tuple(m.value for m in Approximation)
FISHER_TYPES = tuple(m.value for m in Fisher)
#: draws of (t, ε) per training image for the factors (the paper used 125–1000)
DEFAULT_CURVATURE_DRAWS = 125
#: the paper's untuned damping for the K-FAC family
DEFAULT_DAMPING = DEFAULT_KFAC_DAMPING
#: memory the EK-FAC fit may spend keeping the K-FAC pass's layer inputs and output gradients, so that its second
#: pass reads them back instead of running the network again (see :func:`fit_factors`)
DEFAULT_REUSE_BYTES = 512 << 20
FORMAT_VERSION = 2  # 2: the manifest records the payload's SHA-256


def _check_choices(method, kfac_approx, fisher) -> tuple[str, str, str]:
    """The curvature's three choices as plain strings, or a ``ValueError`` naming the bad one."""
    if str(method) not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    return str(method), str(choice(Approximation, kfac_approx, "kfac_approx")), str(choice(Fisher, fisher, "fisher"))


# ---------------------------------------------------------------------------------------------- problems
@dataclass
class FactorProblem:
    """What factor fitting needs: tracked layers and a stream of batches.

    ``batches`` yields ``forward`` callables; each, called inside the capture, returns ``(output, target, z)``:
    the network output ``[rows, ...]`` (one row = one data point of the expectation), the regression target (or
    ``None`` — only ``fisher="empirical"`` needs it) and seeded standard-normal noise of the output's shape (only
    ``fisher="model"`` needs it). The per-row loss is ``mean((target − output)²)`` over the non-row dims.
    """

    layers: dict[str, nn.Module]
    batches: Callable[[], Iterator[Callable[[], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]]]
    num_batches: int | None = None
    #: the whole network, so that all of its parameters (not only the tracked ones) are frozen during passes
    root: nn.Module | None = None


def _diffusion_problem(model: DiffusionModel, images: torch.Tensor, ids: torch.Tensor, *, num_draws: int,
                       seed: int, batch_size: int, max_rows: int, dev: torch.device,
                       dtype: torch.dtype) -> FactorProblem:
    shape = model.image_shape
    S = int(num_draws)
    per_call = max(1, min(S, int(max_rows) // max(1, min(batch_size, images.shape[0]))))
    n_chunks = -(-S // per_call)

    def batches():
        for lo in range(0, images.shape[0], batch_size):
            x = images[lo:lo + batch_size].to(dev, dtype)
            bid = ids[lo:lo + batch_size]
            draws = draw_noise(bid, S, shape, model.num_train_timesteps, seed)
            # MC-Fisher noise, seeded per (seed, id) on its own stream: independent of the batch layout
            z_all = torch.stack([torch.randn((S, *shape), generator=example_generator(seed, int(i), stream=1))
                                 for i in bid.tolist()])
            for s0 in range(0, S, per_call):
                d = draws.select_draws(slice(s0, s0 + per_call)).to(dev, dtype)
                z = z_all[:, s0:s0 + per_call].to(dev, dtype)

                def forward(x=x, d=d, z=z):
                    x_t = model.add_noise(x[:, None], d.noise, d.timesteps)
                    out = model.predict_noise(x_t, d.timesteps)
                    return out.flatten(0, 1), d.noise.flatten(0, 1), z.flatten(0, 1)

                yield forward

    return FactorProblem(tracked_layers(model.unet), batches,
                         num_batches=-(-images.shape[0] // batch_size) * n_chunks, root=model.unet)


# ---------------------------------------------------------------------------------------------- fitting
def _cotangents(out: torch.Tensor, target, z, fisher: str) -> Iterator[torch.Tensor]:
    """Output-space vectors to backpropagate for one batch (several for the exact GGN)."""
    D = out[0].numel()
    if fisher == "model":
        if z is None:
            raise ValueError("fisher='model' needs seeded noise z from the problem")
        yield (2.0 / D) ** 0.5 * z.reshape(out.shape).to(out.dtype)
    elif fisher == "empirical":
        if target is None:
            raise ValueError("fisher='empirical' needs the regression targets")
        yield (2.0 / D) * (out.detach() - target.reshape(out.shape))
    else:  # exact: the columns of H^{1/2} = sqrt(2/D) I, one output coordinate at a time
        flat = torch.zeros(out.shape[0], D, dtype=out.dtype, device=out.device)
        for c in range(D):
            flat.zero_()
            flat[:, c] = (2.0 / D) ** 0.5
            yield flat.reshape(out.shape)


def _concat_calls(cap: LayerCapture, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All calls of a layer as extra weight-sharing positions: ``a [rows, R_total, i]``, ``b [rows, R_total, o]``."""
    recs = list(cap.calls(name))
    if len(recs) == 1:
        return recs[0].a, recs[0].b
    return torch.cat([r.a for r in recs], 1), torch.cat([r.b for r in recs], 1)


def _run_pass(problem: FactorProblem, fisher: str, consume: Callable[[LayerCapture, int, bool], None],
              desc: str, progress: bool, state: dict | None = None, on_batch: Callable[[int], None] | None = None):
    """Iterate the problem's batches; for each cotangent call ``consume(capture, rows, first_cotangent)``."""
    done = int(state.get("batches_done", 0)) if state else 0
    bar = tqdm(total=problem.num_batches, initial=done, desc=desc, unit="batch", disable=not progress)
    with LayerCapture(problem.layers, root=problem.root) as cap:
        for i, forward in enumerate(problem.batches()):
            if i < done:
                continue
            cap.clear()
            with torch.enable_grad():
                out, target, z = forward()
                first = True
                for cot in _cotangents(out, target, z, fisher):
                    for recs in cap.records.values():
                        for r in recs:
                            r.g = None
                    torch.autograd.backward(out, grad_tensors=cot, retain_graph=fisher == "exact")
                    consume(cap, out.shape[0], first)
                    first = False
            cap.clear()
            bar.update(1)
            if on_batch is not None:
                on_batch(i + 1)
    bar.close()


class _Captured:
    """The layer calls of one batch kept from the K-FAC pass (inputs and output gradients), to be read again by
    the EK-FAC pass in place of a second forward and backward pass through the network."""

    def __init__(self, cap: LayerCapture, rows: int):
        self.rows = rows
        self.records = {n: [CallRecord(r.module, r.x, r.g) for r in cap.calls(n)] for n in cap.layers}
        self.nbytes = sum(t.numel() * t.element_size() for recs in self.records.values() for r in recs
                          for t in (r.x, r.g))

    def calls(self, name: str) -> list[CallRecord]:
        return self.records[name]


def fit_factors(problem: FactorProblem, *, method: str = "ekfac", kfac_approx: str = "expand",
                fisher: str = "model", factor_dtype: torch.dtype = torch.float64, progress: bool = False,
                checkpoint: Path | None = None, identity: Mapping | None = None,
                reuse_bytes: int = DEFAULT_REUSE_BYTES) -> dict:
    """Fit K-FAC factors, their eigendecompositions and (for EK-FAC) corrected eigenvalues.

    EK-FAC needs every batch's layer inputs and output gradients twice (for the factors, then for the corrected
    eigenvalues in the factors' eigenbasis). When all of them fit in ``reuse_bytes`` (judged from the first batch:
    no more than one batch is held in vain) and one cotangent per batch is backpropagated (not
    ``fisher="exact"``), the K-FAC pass keeps them and the second pass reads them back
    instead of running the network again; otherwise, or after a resumed K-FAC pass, the network runs twice. On the
    CPU both give the same bits (the network is deterministic for the same batches).

    Sums and counts are all-reduced over ranks when ``torch.distributed`` is initialised, so each rank may feed
    its own shard of the data. With ``checkpoint`` (a file path), the partial sums, the stage of the fit and its
    identity (``identity``: fingerprints, draws, seed, ... of the data fed in, plus the settings here) are saved as
    one file in one atomic write after every batch, and an interrupted fit resumes where it stopped, to the same
    bits as an uninterrupted one. A checkpoint of another fit is refused
    (:class:`~.artifacts.CheckpointMismatchError`).
    """
    method, kfac_approx, fisher = _check_choices(method, kfac_approx, fisher)
    names = list(problem.layers)
    dev = next(iter(problem.layers.values())).weight.device
    sums: dict[str, torch.Tensor] = {}
    for n in names:
        o, i = layer_shape(problem.layers[n])
        sums[f"A/{n}"] = torch.zeros(i, i, dtype=factor_dtype, device=dev)
        sums[f"B/{n}"] = torch.zeros(o, o, dtype=factor_dtype, device=dev)
        sums[f"nA/{n}"] = torch.zeros((), dtype=factor_dtype, device=dev)
    sums["rows"] = torch.zeros((), dtype=factor_dtype, device=dev)
    stage = {"pass": "kfac", "batches_done": 0}
    ident = {**dict(identity or {}), "method": method, "kfac_approx": kfac_approx, "fisher": fisher,
             "factor_dtype": str(factor_dtype), "layers": names, "num_batches": problem.num_batches}
    if checkpoint is not None:
        remove_stale_temporaries(Path(checkpoint).parent, Path(checkpoint).name)  # left by a run killed mid-write
    if checkpoint is not None and Path(checkpoint).is_file():
        saved, stage = load_fit_checkpoint(Path(checkpoint), ident, list(sums))
        sums.update({k: v.to(dev) for k, v in saved.items()})

    def save_state(batches_done: int) -> None:
        if checkpoint is None:
            return
        stage["batches_done"] = batches_done
        save_fit_checkpoint(Path(checkpoint), sums, ident, stage)

    def _cov(x_cols: torch.Tensor) -> torch.Tensor:
        """Σ over rows and positions of x xᵀ for ``[rows, d, R]``: one GEMM in the compute dtype, summed in float64."""
        x2 = x_cols.transpose(0, 1).reshape(x_cols.shape[1], -1)
        return (x2 @ x2.T).to(factor_dtype)

    # the K-FAC pass's captured calls, kept for the EK-FAC pass while they fit in reuse_bytes (None: not kept)
    kept: list[_Captured] | None = ([] if method == "ekfac" and fisher != "exact" and reuse_bytes > 0
                                    and stage["pass"] == "kfac" and not stage["batches_done"] else None)
    kept_bytes = 0

    def consume_kfac(cap: LayerCapture, rows: int, first: bool) -> None:
        nonlocal kept, kept_bytes
        if first:
            sums["rows"] += rows
        if kept is not None:
            kept.append(_Captured(cap, rows))
            kept_bytes += kept[-1].nbytes
            # the whole pass, judged from the batches so far: over the budget, the EK-FAC pass runs the network again
            if kept_bytes / len(kept) * max(problem.num_batches or 0, len(kept)) > reuse_bytes:
                kept = None
        for n in names:
            if kfac_approx == "expand":
                # positions of every call are extra data points: contributions simply add up
                for rec in cap.calls(n):
                    if first:  # (chunked im2col in a reused workspace: one layer's patches never all at once)
                        A = sums[f"A/{n}"]
                        s_a, count = add_input_covariance_(A, rec.module, rec.x)
                        d_in = s_a.shape[0]
                        if rec.has_bias:
                            A[:d_in, d_in] += s_a
                            A[d_in, :d_in] += s_a
                            A[d_in, d_in] += count
                        sums[f"nA/{n}"] += count
                    sums[f"B/{n}"] += _cov(rec.b_cols)
            else:
                a, b = _concat_calls(cap, n)
                if first:
                    am = a.mean(1)
                    sums[f"A/{n}"] += (am.T @ am).to(factor_dtype)
                    sums[f"nA/{n}"] += a.shape[0]
                bs = b.sum(1)
                sums[f"B/{n}"] += (bs.T @ bs).to(factor_dtype)

    if stage["pass"] == "kfac":
        _run_pass(problem, fisher, consume_kfac, f"K-FAC factors ({kfac_approx}, GGN^{fisher})", progress, stage,
                  save_state)
        for v in sums.values():
            all_reduce_sum_(v)
        stage.update({"pass": "eigen", "batches_done": 0})
        save_state(0)

    out: dict = {"layers": names, "num_points": float(sums["rows"]), "q_a": {}, "q_b": {}, "lambda_a": {},
                 "lambda_b": {}, "eigenvalues": {}}
    rows = sums["rows"].clamp_min(1)
    for n in names:
        A = sums[f"A/{n}"] / sums[f"nA/{n}"].clamp_min(1)
        B = sums[f"B/{n}"] / rows
        la, qa = torch.linalg.eigh(0.5 * (A + A.T))
        lb, qb = torch.linalg.eigh(0.5 * (B + B.T))
        # A and B are PSD; eigh can return tiny negative values from rounding — clamp so λ + eig stays > 0
        la, lb = la.clamp_min(0), lb.clamp_min(0)
        out["q_a"][n], out["q_b"][n], out["lambda_a"][n], out["lambda_b"][n] = qa, qb, la, lb
        out["eigenvalues"][n] = torch.outer(lb, la)

    if method == "ekfac":
        lam_sums = sums if stage["pass"] == "ekfac" else {}
        for n in names:
            lam_sums.setdefault(f"L/{n}", torch.zeros_like(out["eigenvalues"][n]))
        sums.update(lam_sums)
        if stage["pass"] != "ekfac":
            sums["rows_ekfac"] = torch.zeros((), dtype=factor_dtype, device=dev)
            stage.update({"pass": "ekfac", "batches_done": 0})

        def consume_ekfac(cap: LayerCapture, rows: int, first: bool) -> None:
            if first:
                sums["rows_ekfac"] += rows
            for n in names:
                # per-row weight gradients G_n (conv: the weight-gradient kernel), then Q_Bᵀ G_n Q_A
                recs = list(cap.calls(n))
                g = None
                for rec in recs:
                    if g is None:  # the first call writes the buffer, later ones add to it
                        o, i = layer_shape(problem.layers[n])
                        g = rec.add_per_example_(rec.x.new_empty(rows, o, i), accumulate=False)
                    else:
                        rec.add_per_example_(g)
                if g is None:
                    continue  # a layer the network did not call contributes nothing
                qa, qb_t = q_compute[n]
                g_rot = torch.matmul(qb_t, g).matmul(qa)  # Q_Bᵀ G Q_A, per row
                sums[f"L/{n}"] += g_rot.pow_(2).sum(0).to(factor_dtype)

        compute_dtype = next(iter(problem.layers.values())).weight.dtype
        q_compute = {n: (out["q_a"][n].to(compute_dtype), out["q_b"][n].T.to(compute_dtype).contiguous())
                     for n in names}

        if kept is not None:  # (only when this call ran the whole K-FAC pass)
            for i, batch in enumerate(tqdm(kept, desc=f"EK-FAC eigenvalues (GGN^{fisher}, kept activations)",
                                           unit="batch", disable=not progress)):
                consume_ekfac(batch, batch.rows, True)
                kept[i] = None  # free each batch once it is read
                save_state(i + 1)
        else:
            _run_pass(problem, fisher, consume_ekfac, f"EK-FAC eigenvalues (GGN^{fisher})", progress, stage,
                      save_state)
        kept = None
        all_reduce_sum_(sums["rows_ekfac"])
        for n in names:
            all_reduce_sum_(sums[f"L/{n}"])
            out["eigenvalues"][n] = sums[f"L/{n}"] / sums["rows_ekfac"].clamp_min(1)
    if checkpoint is not None and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    return out


# ---------------------------------------------------------------------------------------------- Curvature
@dataclass
class Curvature:
    """A fitted (E)K-FAC curvature: per layer, eigenbases ``q_a``, ``q_b`` and eigenvalues ``[d_out, d_in+1]``.

    ``precondition(g, λ) = Q_B ((Q_Bᵀ g Q_A) / (eigenvalues + λ)) Q_Aᵀ`` per layer, i.e. ``(G + λI)⁻¹ g`` with G
    the block-diagonal (E)K-FAC approximation. Use :meth:`rotate` once and :meth:`precondition_rotated` for
    each new λ when λ changes often (the damping slider).
    """

    layer_names: list[str]
    q_a: dict[str, torch.Tensor]
    q_b: dict[str, torch.Tensor]
    lambda_a: dict[str, torch.Tensor]
    lambda_b: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)
    model_fingerprint: str = ""
    dataset_fingerprint: str = ""
    num_points: float = 0.0

    @classmethod
    def from_factors(cls, fitted: Mapping, **kw) -> "Curvature":
        return cls(list(fitted["layers"]), dict(fitted["q_a"]), dict(fitted["q_b"]), dict(fitted["lambda_a"]),
                   dict(fitted["lambda_b"]), dict(fitted["eigenvalues"]), num_points=float(fitted["num_points"]),
                   **kw)

    # -- linear algebra -------------------------------------------------------------------------
    def _layers_of(self, grads) -> dict[str, torch.Tensor]:
        layers = grads.layers if isinstance(grads, LayerGradients) else dict(grads)
        missing = [n for n in self.layer_names if n not in layers]
        if missing:
            raise ValueError(f"gradients lack layers {missing[:3]}{'...' if len(missing) > 3 else ''} of this "
                             "curvature (was it fitted for another model?)")
        return layers

    def _apply(self, grads, fn):
        layers = self._layers_of(grads)
        if isinstance(grads, LayerGradients):
            return LayerGradients({n: fn(n, layers[n]) for n in self.layer_names}, grads.ids,
                                  None if grads.band_layers is None else
                                  {n: fn(n, grads.band_layers[n]) for n in self.layer_names},
                                  grads.bands, dict(grads.meta))
        return {n: fn(n, layers[n]) for n in self.layer_names}

    def rotate(self, grads):
        """``Q_Bᵀ g Q_A`` per layer (into the eigenbasis), for ``[..., d_out, d_in+1]`` tensors."""
        return self._apply(grads, lambda n, g: self.q_b[n].to(g).T @ g @ self.q_a[n].to(g))

    def unrotate(self, grads):
        """``Q_B g Q_Aᵀ`` per layer (back to parameter space)."""
        return self._apply(grads, lambda n, g: self.q_b[n].to(g) @ g @ self.q_a[n].to(g).T)

    def inverse_eigenvalues(self, damping: float) -> dict[str, torch.Tensor]:
        """``1 / (eigenvalues + λ)`` per layer — a new tensor; the stored eigenvalues are never touched."""
        lam = check_damping(damping)
        return {n: 1.0 / (self.eigenvalues[n] + lam) for n in self.layer_names}

    def precondition_rotated(self, rotated, damping: float):
        """Divide already-rotated gradients by ``eigenvalues + λ`` (stays in the eigenbasis)."""
        inv = self.inverse_eigenvalues(damping)
        return self._apply(rotated, lambda n, g: g * inv[n].to(g))

    def precondition(self, grads, damping: float = DEFAULT_DAMPING):
        """``(G + λI)⁻¹ g`` per layer with exact damping."""
        return self.unrotate(self.precondition_rotated(self.rotate(grads), damping))

    def dense_blocks(self) -> dict[str, torch.Tensor]:
        """The approximation's dense per-layer blocks ``[P_l, P_l]`` in row-major ``[d_out, d_in+1]`` order."""
        out = {}
        for n in self.layer_names:
            Q = torch.kron(self.q_b[n], self.q_a[n])
            out[n] = Q @ torch.diag(self.eigenvalues[n].reshape(-1)) @ Q.T
        return out

    def mean_eigenvalue(self) -> float:
        """τ = trace / size of the (E)K-FAC matrix (mean of all its eigenvalues): the scale of a relative λ."""
        total = sum(float(self.eigenvalues[n].double().sum()) for n in self.layer_names)
        return total / max(1, self.num_parameters)

    @property
    def num_parameters(self) -> int:
        return int(sum(self.eigenvalues[n].numel() for n in self.layer_names))

    # -- persistence ----------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {"format": "diffinfluence-curvature", "version": FORMAT_VERSION, "layers": self.layer_names,
                "settings": self.settings, "model_fingerprint": self.model_fingerprint,
                "dataset_fingerprint": self.dataset_fingerprint, "num_points": self.num_points}

    def save(self, path: str | Path) -> Path:
        """Write ``path/curvature.safetensors`` and ``path/manifest.json`` (with the payload's SHA-256) atomically,
        manifest last."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for n in self.layer_names:
            for key, d in (("q_a", self.q_a), ("q_b", self.q_b), ("lambda_a", self.lambda_a),
                           ("lambda_b", self.lambda_b), ("eigenvalues", self.eigenvalues)):
                tensors[f"{key}/{n}"] = d[n].detach().cpu().contiguous()
        digest = save_safetensors(p / "curvature.safetensors", tensors)
        atomic_write_json(p / "manifest.json", {**self.manifest(), "sha256": {"curvature.safetensors": digest}},
                          indent=2)
        return p

    @classmethod
    def load(cls, path: str | Path, *, model: DiffusionModel | None = None, dataset=None,
             expect: Mapping | None = None, device=None) -> "Curvature":
        """Load a saved curvature; refuse it if it was built for another model, dataset or setting.

        A truncated or altered file (manifest or payload) raises :class:`~.._io.CorruptArtifactError` naming it.
        """
        p = Path(path)
        man = read_manifest(p, "curvature.safetensors", "diffinfluence-curvature", "curvature", model=model,
                            dataset=dataset, expect=expect)
        f = p / "curvature.safetensors"
        t = load_safetensors(f, (man.get("sha256") or {}).get("curvature.safetensors"),
                             device=str(resolve_device(device)) if device else "cpu")
        names = man["layers"]
        try:
            parts = {key: {n: t[f"{key}/{n}"] for n in names}
                     for key in ("q_a", "q_b", "lambda_a", "lambda_b", "eigenvalues")}
        except KeyError as e:
            raise CorruptArtifactError(f"{f} lacks tensor {e.args[0]!r} that its manifest lists", f) from None
        return cls(names, parts["q_a"], parts["q_b"], parts["lambda_a"], parts["lambda_b"], parts["eigenvalues"],
                   settings=man["settings"], model_fingerprint=man["model_fingerprint"],
                   dataset_fingerprint=man["dataset_fingerprint"], num_points=man["num_points"])


def fit_curvature(model: DiffusionModel, dataset, *, method: str = "ekfac", kfac_approx: str = "expand",
                  fisher: str = "model", num_draws: int = DEFAULT_CURVATURE_DRAWS, seed: int = 0,
                  batch_size: int = 32, max_rows: int = 512, device=None, dtype: torch.dtype | None = None,
                  factor_dtype: torch.dtype = torch.float64, progress: bool = True,
                  checkpoint_dir: str | Path | None = None, reuse_bytes: int = DEFAULT_REUSE_BYTES) -> Curvature:
    """Fit (E)K-FAC curvature of the GGN of the diffusion training loss on ``dataset`` (``.images``, ``.ids``).

    Defaults are the paper's recommended settings: EK-FAC, K-FAC-expand, GGN^model (MC Fisher, one sample per
    draw). ``num_draws`` (t, ε) draws per training image go into each factor. Under ``torchrun`` each rank takes a
    contiguous shard of the dataset and factor sums are all-reduced, so every rank ends with the same curvature.
    ``checkpoint_dir`` makes the fit resumable after an interruption. ``reuse_bytes``: memory EK-FAC may use to
    keep the first pass's layer inputs and output gradients for its second pass (see :func:`fit_factors`).
    """
    method, kfac_approx, fisher = _check_choices(method, kfac_approx, fisher)
    if int(num_draws) < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    images, ids = dataset.images, torch.as_tensor(dataset.ids, dtype=torch.long)
    if images.shape[0] == 0:
        raise ValueError(f"cannot fit a curvature on an empty dataset ({getattr(dataset, 'name', 'dataset')!r} has "
                         "0 images)")
    model.check_images(images, "training images")
    dev = resolve_device(device) if device is not None else model.device
    model.to(dev)
    dt = dtype or model.dtype
    if dt != model.dtype:
        model.to(dtype=dt)
    rank, world = rank_and_world()
    sl = shard_slice(images.shape[0], rank, world)
    problem = _diffusion_problem(model, images[sl], ids[sl], num_draws=num_draws, seed=seed,
                                 batch_size=int(batch_size), max_rows=int(max_rows), dev=dev, dtype=dt)
    settings = {"method": method, "kfac_approx": kfac_approx, "fisher": fisher, "num_draws": int(num_draws),
                "seed": int(seed), "loss": "mean over pixels, mean over examples",
                "mc_fisher": "one sample per draw, cotangent sqrt(2/D) z (E[bb^T] = J^T H J, H = 2/D I)",
                "bias": "folded into the layer input as a constant 1", "mode": "eval"}
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir) / f"factors-rank{rank}-of{world}.safetensors"
    data_fp = dataset.fingerprint() if hasattr(dataset, "fingerprint") else ""
    identity = {"model_fingerprint": model.fingerprint(), "dataset_fingerprint": data_fp, "num_draws": int(num_draws),
                "seed": int(seed), "batch_size": int(batch_size), "max_rows": int(max_rows), "dtype": str(dt),
                "rank": rank, "world": world}
    with frozen_eval(model.unet):
        fitted = fit_factors(problem, method=method, kfac_approx=kfac_approx, fisher=fisher,
                             factor_dtype=factor_dtype, progress=progress and rank == 0, checkpoint=ckpt,
                             identity=identity, reuse_bytes=int(reuse_bytes))
    return Curvature.from_factors(fitted, settings=settings, model_fingerprint=model.fingerprint(),
                                  dataset_fingerprint=data_fp)
