"""diffinfluence-widgets: influence functions for diffusion models, explored in notebook widgets.

Implements Mlodozeniec et al., "Influence Functions for Scalable Data Attribution in Diffusion Models"
(ICLR 2025): measurement proxies, K-FAC / EK-FAC curvature of the GGN (expand / reduce), exact damping, TRAK-style
baselines, and the LDS / retraining evaluations; plus a FAISS index over projected gradients and anywidget views.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

if "torch" not in _sys.modules:
    # Large CPU buffers (a batch's per-example gradients are B × P floats) in transparent huge pages: a fresh
    # multi-MB buffer otherwise page-faults in 4 KiB at a time, which on Linux costs as much as computing into it.
    # PyTorch reads this once, at its first allocation, so it only takes effect when this package is imported
    # before torch (the command line, the backend server, the benches); set THP_MEM_ALLOC_ENABLE=0 to opt out.
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

#: the researcher's API, importable from the top level (loaded on first use, so that ``import
#: diffinfluence_widgets`` stays light for the command line): datasets that keep your ids and labels, one call
#: that scores queries with any method over a λ grid, and the LDS / counterfactual evaluation on any data.
_PUBLIC = {
    "ImageDataset": "data", "from_arrays": "data", "from_image_folder": "data", "from_torch_dataset": "data",
    "load_digits": "data", "attribute": "evaluation", "Attributor": "evaluation", "Attribution": "evaluation",
    "AttributionSettings": "evaluation", "METHODS": "evaluation", "evaluate": "evaluation",
    "EvaluationSettings": "evaluation", "Evaluation": "evaluation", "train_ensemble": "evaluation",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
