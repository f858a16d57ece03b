"""EK-FAC fit + pairwise influence scores: ours vs kronfluence, same model, data, (t, ε) draws and float64 settings.

kronfluence is not a dependency of this project: install it into a side environment that also sees this one
(kronfluence 1.0.1 imports no torchvision at run time; a torchvision wheel that does not match the CPU torch breaks
diffusers' import, so it is removed):

    python -m venv /tmp/kf && /tmp/kf/bin/pip install torch==2.13.0 kronfluence
    /tmp/kf/bin/pip uninstall -y torchvision
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \
        > "$(/tmp/kf/bin/python -c 'import site; print(site.getsitepackages()[0])')/main.pth"
    PYTHONPATH=. /tmp/kf/bin/python bench/kronfluence.py --threads 1

The default is the larger setting (16×16 digits, 64 training images, 8 draws); ``--size 8 --num-train 32
--draws 4`` is the small one. The two sides run alternately ``--repeats`` times and each side's fastest run is
compared (the shared machine's load drifts).

Both sides fit EK-FAC of the GGN^model (MC Fisher with the same seeded z, one sample per draw, every (example, draw)
row a data point, bias folded into the input) on every Conv2d / Linear layer and score each query's loss gradient
against every training example's loss gradient with damping λ added to the corrected eigenvalues. EK-FAC's
eigenvalues do not depend on how the Kronecker factors are normalised (only their eigenvectors enter), so the two
libraries' conventions for A and B (kronfluence divides by examples, we by positions) do not change the scores.
Both fits read every batch's layer inputs and output gradients twice (factors, then corrected eigenvalues);
kronfluence runs the network for each, ours keeps the first pass's (``fit_curvature(reuse_bytes=…)``, 512 MiB by
default; 478 MiB at the default setting here) and reads them back.

Prints one run's wall times and

    RATIO fit+scores=<ours / kronfluence>          (goal ≤ 0.5)
    SPEARMAN <rank correlation of the two score matrices>     (goal ≥ 0.999)
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-train", type=int, default=64)
    ap.add_argument("--num-queries", type=int, default=4)
    ap.add_argument("--draws", type=int, default=8, help="(t, ε) draws per example (factors and gradients)")
    ap.add_argument("--size", type=int, default=16, help="image size of the tiny UNet (with attention)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="run both sides this many times, alternating, and compare each side's fastest run (the "
                         "shared machine's load drifts within a minute)")
    ap.add_argument("--damping", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (reported with the figure)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # this file is called kronfluence.py: take its folder off the path so that the package is imported
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.modules.pop("kronfluence", None)

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from diffinfluence_widgets.data import load_digits
    from diffinfluence_widgets.diffusion.draws import draw_noise, example_generator
    from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
    from diffinfluence_widgets.evaluation.lds import spearman
    from diffinfluence_widgets.influence.curvature import fit_curvature
    from diffinfluence_widgets.influence.scores import compute_scores

    S, lam = args.draws, args.damping
    train = load_digits(size=args.size, split="train", limit=args.num_train)
    held = load_digits(size=args.size, split="heldout", limit=args.num_queries)
    model = DiffusionModel.from_config(tiny_unet_config(args.size), seed=0).to("cpu", torch.float64)
    model.unet.eval()
    shape, T = model.image_shape, model.num_train_timesteps
    curv_seed, query_seed, train_seed = 1, 2, 3

    def run_ours():
        t0 = time.perf_counter()
        curv = fit_curvature(copy.deepcopy(model), train, method="ekfac", num_draws=S, seed=curv_seed,
                             batch_size=args.batch_size, dtype=torch.float64, progress=False)
        t_fit = time.perf_counter() - t0
        ours = compute_scores(model, curv, held.images, held.ids, train, damping=lam, num_draws=S,
                              train_num_draws=S, seed=query_seed, train_seed=train_seed, batch_size=args.batch_size,
                              dtype=torch.float64, progress=False)
        return t_fit, time.perf_counter() - t0, np.asarray(ours.matrix, dtype=np.float64)

    # ---- kronfluence, fed the very same draws
    def rows(images, ids, seed, with_z):
        d = draw_noise(torch.as_tensor(ids), S, shape, T, seed)
        z = (torch.stack([torch.randn((S, *shape), generator=example_generator(seed, int(i), stream=1))
                          for i in torch.as_tensor(ids).tolist()]) if with_z else torch.zeros_like(d.noise))
        return images.double(), d.timesteps, d.noise.double(), z.double()

    class Rows(Dataset):
        """Items (x, t [s], ε [s, C, H, W], z [s, C, H, W]); per_draw=True: one item per (example, draw)."""

        def __init__(self, x, t, eps, z, per_draw):
            self.x, self.t, self.eps, self.z, self.per_draw = x, t, eps, z, per_draw

        def __len__(self):
            return self.x.shape[0] * (S if self.per_draw else 1)

        def __getitem__(self, i):
            if self.per_draw:
                n, s = divmod(i, S)
                return self.x[n], self.t[n, s:s + 1], self.eps[n, s:s + 1], self.z[n, s:s + 1]
            return self.x[i], self.t[i], self.eps[i], self.z[i]

    D = math.prod(shape)
    dm = copy.deepcopy(model)  # kronfluence wraps its network's modules: its own copy, ours stays plain

    class DiffusionTask(Task):
        def _out(self, batch):  # (kronfluence hands its wrapped UNet in; it is dm.unet itself, see below)
            x, t, eps, z = batch
            return dm.predict_noise(dm.add_noise(x[:, None], eps, t), t), eps, z

        def compute_train_loss(self, batch, model, sample=False):
            out, eps, z = self._out(batch)
            if sample:  # MC Fisher: output cotangent sqrt(2/D) z, as ours (E[b bᵀ] = Jᵀ (2/D) I J)
                return (out * (math.sqrt(2.0 / D) * z)).sum()
            return (eps - out).pow(2).mean(dim=(2, 3, 4)).mean(1).sum()  # Σ over examples of the loss

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

    task = DiffusionTask()
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=False,
                            activation_covariance_dtype=torch.float64, gradient_covariance_dtype=torch.float64,
                            eigendecomposition_dtype=torch.float64, per_sample_gradient_dtype=torch.float64,
                            lambda_dtype=torch.float64)
    sargs = ScoreArguments(damping_factor=lam, per_sample_gradient_dtype=torch.float64,
                           precondition_dtype=torch.float64, score_dtype=torch.float64)
    fac_ds = Rows(*rows(train.images, train.ids, curv_seed, True), per_draw=True)
    train_ds = Rows(*rows(train.images, train.ids, train_seed, False), per_draw=False)
    query_ds = Rows(*rows(held.images, held.ids, query_seed, False), per_draw=False)
    dm.unet = wrapped = prepare_model(dm.unet, task)  # the task's forward goes through the wrapped modules

    def run_kronfluence():
        with tempfile.TemporaryDirectory() as tmp:
            an = Analyzer("bench", wrapped, task, cpu=True, disable_tqdm=True, output_dir=tmp)
            t0 = time.perf_counter()
            an.fit_all_factors("ekfac", fac_ds, per_device_batch_size=args.batch_size * S, factor_args=fargs,
                               overwrite_output_dir=True)
            t_kf_fit = time.perf_counter() - t0
            an.compute_pairwise_scores("scores", "ekfac", query_ds, train_ds,
                                       per_device_query_batch_size=len(query_ds),
                                       per_device_train_batch_size=args.batch_size, score_args=sargs,
                                       overwrite_output_dir=True)
            t_kf = time.perf_counter() - t0
            rows_scores = an.load_pairwise_scores("scores")["all_modules"].double().numpy()
        # kronfluence takes every network row (example × draw) for a sample; each row's loss carries 1/S, so by
        # bilinearity an example pair's score is the sum of its S × S row-pair scores
        return t_kf_fit, t_kf, rows_scores.reshape(len(held), S, len(train), S).sum(axis=(1, 3))

    runs_ours, runs_kf = [], []
    for _ in range(max(1, args.repeats)):  # alternating, so that both sides see the same drift in load
        runs_ours.append(run_ours())
        runs_kf.append(run_kronfluence())
    t_fit, t_ours, ours_m = min(runs_ours, key=lambda r: r[1])
    t_kf_fit, t_kf, theirs = min(runs_kf, key=lambda r: r[1])

    rel = float(np.linalg.norm(ours_m - theirs) / np.linalg.norm(theirs))
    rho = spearman(ours_m.reshape(-1), theirs.reshape(-1))
    print(f"model=tiny_unet_config({args.size}) train={len(train)} queries={len(held)} draws={S} damping={lam:g} "
          f"float64 threads={args.threads} repeats={args.repeats} (fastest of each side)")
    print(f"ours        : fit {t_fit:7.2f} s   fit+scores {t_ours:7.2f} s")
    print(f"kronfluence : fit {t_kf_fit:7.2f} s   fit+scores {t_kf:7.2f} s")
    print(f"relative difference of the score matrices = {rel:.2e}")
    print(f"SPEARMAN {rho:.5f}   (goal >= 0.999)")
    print(f"RATIO fit+scores={t_ours / t_kf:.3f}   (ours / kronfluence; goal <= 0.5)")
    return {"ratio": t_ours / t_kf, "spearman": rho, "rel": rel}


if __name__ == "__main__":
    main()
