"""The README's quickstart, `.ci/run` and the code stay in step."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CI = (REPO / ".ci" / "run").read_text()


def _quickstart_commands() -> list[str]:
    quick = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]


def test_two_commands_that_install_torch_first():
    cmds = _quickstart_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    for c in cmds:
        steps = [s.strip() for s in c.split("&&")]
        assert "pip install torch==2.13.0" in steps
        project = next(i for i, s in enumerate(steps) if s.startswith("pip install -e"))
        assert steps.index("pip install torch==2.13.0") < project
    assert cmds[0].endswith("diffinfluence demo")
    assert cmds[1].endswith("python -m pytest tests/")


def test_ci_runs_the_readme_test_command():
    test_cmd = _quickstart_commands()[1].split("&&")[-1].strip()
    assert re.search(rf"^{re.escape(test_cmd)}(\s|$)", CI, flags=re.M), f"{test_cmd!r} not in .ci/run"
    assert "set -euo pipefail" in CI and "pip install torch==2.13.0" in CI
    assert CI.index("pip install torch==2.13.0") < CI.index("pip install -e")
    assert "apt-get install -y chromium" in CI and "no tests ran" in CI


def test_cli_options_in_the_readme_exist():
    from diffinfluence_widgets.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices
    for command in ("demo", "train", "build", "serve", "evaluate"):
        assert f"diffinfluence {command}" in README or f"| {command}" in README or command in README
        assert command in sub
    for opt in set(re.findall(r"(--[a-z][a-z-]+)", README)):
        if opt in ("--extra-index-url", "--index-url", "--no-build", "--debug", "--quick"):  # pip, repo2docker, bench
            continue
        assert any(opt in a.option_strings for parser in sub.values() for a in parser._actions), opt


def test_notebooks_named_in_the_readme_exist():
    for name in re.findall(r"notebooks/([\w.]+\.ipynb)", README):
        assert (REPO / "notebooks" / name).is_file(), name


def test_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's first Python example runs as written (on the tiny config, in a scratch folder).

    It builds an explorer (whose threaded session starts working at once) and then an inline session on the same
    backend: the two must not corrupt each other's work on the shared network (a regression: concurrent
    gradient captures used to toggle each other's ``requires_grad``)."""
    import torch

    threads = torch.get_num_threads()
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    assert 'load_or_build_demo("demo")' in code
    code = code.replace('load_or_build_demo("demo")', 'load_or_build_demo("tiny", progress=False)')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFINFLUENCE_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    session = scope["session"]
    assert session.error == ""
    assert len(session.result.proponents) == 8
    assert [p.score for p in session.result.proponents] == sorted((p.score for p in session.result.proponents),
                                                                   reverse=True)
    assert (tmp_path / "card.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
