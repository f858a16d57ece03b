"""``build`` under torchrun (gloo): data-parallel training, the curvature fit and the store shards split over 2
ranks, shared artifacts written once by rank 0 — and the result equals the 1-process build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffinfluence_widgets.diffusion import DiffusionModel
from diffinfluence_widgets.influence.curvature import Curvature

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("build_torchrun_script.py")


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def _store_features(cache: Path) -> dict[str, np.ndarray]:
    out = {}
    for mf in sorted(cache.glob("index/stores/*/manifest.json")):
        man = json.loads(mf.read_text())
        assert man["complete"], mf
        for shard in sorted(mf.parent.glob("shards/*.npz")):
            with np.load(shard) as z:
                for k in z.files:
                    # (the folder's digest names the model, which differs in its last bits)
                    out[f"{mf.parent.name.rsplit('-', 1)[0]}/{shard.stem}/{k}"] = z[k]
    return out


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_two_rank_build_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(SCRIPT), str(one)], env=_env(), check=True, timeout=900)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(SCRIPT), str(two)], env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # the model: data-parallel training sums each batch's gradient in another order, nothing else differs
    m1, m2 = DiffusionModel.from_pretrained(one / "model"), DiffusionModel.from_pretrained(two / "model")
    p1 = torch.cat([p.detach().reshape(-1) for p in m1.unet.parameters()])
    p2 = torch.cat([p.detach().reshape(-1) for p in m2.unet.parameters()])
    assert _rel(p2, p1) <= 1e-4 and not torch.equal(p1, torch.zeros_like(p1))  # measured: 7e-6
    # the curvature: each rank fitted its half, sums all-reduced
    c1, c2 = Curvature.load(one / "curvature"), Curvature.load(two / "curvature")
    assert c1.layer_names == c2.layer_names and c1.num_points == c2.num_points
    for n in c1.layer_names:
        assert _rel(c2.eigenvalues[n], c1.eigenvalues[n]) <= 1e-3, n
    # the stores: both shards present (one per rank), the same features
    f1, f2 = _store_features(one), _store_features(two)
    assert sorted(f1) == sorted(f2) and any("/shard-00001/" in k for k in f1)
    for k in f1:
        assert _rel(f2[k], f1[k]) <= 1e-3, k
    # shared artifacts written once, atomically: every step recorded, no temporary left behind
    for step in ("model", "curvature", "index"):
        assert json.loads((two / step / "step.json").read_text())["step"] == step
    assert not [p for p in two.rglob("*") if ".tmp" in p.name]
    assert not (two / "train-checkpoint").exists() and not (two / "curvature-checkpoint").exists()
