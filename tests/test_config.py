"""Config objects and enums: validated where they enter, names spelled once."""
import pytest

from diffinfluence_widgets.config import (IndexConfig, IndexKind, Method, StoreConfig, StoreSpace, check_damping,
                                          split_settings)
from diffinfluence_widgets.influence.curvature import METHODS
from diffinfluence_widgets.influence.preconditioners import PRECONDITIONERS


def test_enums_are_strings_and_every_method_is_registered():
    assert Method.EKFAC == "ekfac" and str(StoreSpace.EIGEN) == "eigen" and f"{IndexKind.IVF}" == "ivf"
    assert set(PRECONDITIONERS) == set(Method)
    assert METHODS == ("ekfac", "kfac")


def test_configs_validate_their_fields():
    assert StoreConfig(space="parameter").space is StoreSpace.PARAMETER
    assert IndexConfig(methods=["trak"]).methods == (Method.TRAK,)
    for bad, match in ((dict(k=0), "StoreConfig.k"), (dict(space="weird"), "space='weird'"),
                       (dict(whiten_damping=0.0), "damping"), (dict(batch_size=True), "batch_size")):
        with pytest.raises(ValueError, match=match):
            StoreConfig(**bad)
    for bad, match in ((dict(methods=("nope",)), "method='nope'"), (dict(index_kind="lsh"), "index_kind='lsh'"),
                       (dict(methods=()), "non-empty"), (dict(rescore_candidates=-1), "rescore_candidates"),
                       (dict(switch_damping=-1.0), "damping")):
        with pytest.raises(ValueError, match=match):
            IndexConfig(**bad)
    with pytest.raises(Exception):  # frozen
        StoreConfig().k = 3  # type: ignore[misc]


def test_settings_are_routed_to_their_config():
    s, i = split_settings({"k": 8, "methods": ("trak",)}, StoreConfig, IndexConfig)
    assert s == {"k": 8} and i == {"methods": ("trak",)}
    with pytest.raises(TypeError, match="'kk'"):
        split_settings({"kk": 8}, StoreConfig, IndexConfig)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_damping_rule(bad):
    with pytest.raises(ValueError, match=repr(bad) if bad == bad else "nan"):
        check_damping(bad)
    assert check_damping("1e-3") == 1e-3


@pytest.mark.parametrize("env,first,want", [(None, "diffinfluence_widgets", "1"), ("0", "diffinfluence_widgets", "0"),
                                            (None, "torch", None)])
def test_huge_page_allocation_setting(env, first, want):
    """Imported before torch, the package asks PyTorch for transparent huge pages (unless the user said 0); after
    torch it changes nothing (PyTorch has already read the setting)."""
    import os
    import subprocess
    import sys

    e = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env is not None:
        e["THP_MEM_ALLOC_ENABLE"] = env
    code = (f"import {first}, diffinfluence_widgets, os; "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(want)
