"""The evaluation's retraining and measurement jobs under torchrun (gloo): 2 ranks claim jobs from the
content-addressed cache, give the 1-process result bit for bit, and survive SIGKILL of a rank (the rerun takes
the dead rank's job over and recomputes nothing that was finished)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffinfluence_widgets.claims import JobClaims, drain

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("lds_torchrun_script.py")


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def _torchrun(cache: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(SCRIPT), str(cache), str(out)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finished(cache: Path) -> dict[str, tuple[int, int]]:
    """Every finished artifact (job manifests, cached measurements) with its inode and mtime."""
    out = {}
    for p in list(cache.glob("jobs/*/manifest.json")) + list(cache.glob("jobs/*/measurements/*.npy")):
        st = p.stat()
        out[str(p.relative_to(cache))] = (st.st_ino, st.st_mtime_ns)
    return out


def test_two_rank_lds_equals_one_process_and_survives_sigkill(tmp_path):
    # the reference: one plain process
    one = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "c1"), str(tmp_path / "o1")], env=_env(),
                         capture_output=True, text=True, timeout=1800)
    assert one.returncode == 0, one.stdout + one.stderr
    ref = np.load(tmp_path / "o1" / "result.npz")
    assert int(ref["world"][0]) == 1 and len(list((tmp_path / "c1").glob("jobs/*/manifest.json"))) == 6

    # two ranks, uninterrupted: bit-identical targets (hence LDS); both ranks trained some of the jobs
    run = _torchrun(tmp_path / "c2", tmp_path / "o2")
    log = run.communicate(timeout=1800)[0]
    assert run.returncode == 0, log
    two = np.load(tmp_path / "o2" / "result.npz")
    assert int(two["world"][0]) == 2
    assert np.array_equal(two["targets"], ref["targets"]) and np.array_equal(two["lds"], ref["lds"])
    assert "trained here" in log and "done elsewhere" in log

    # two ranks, one SIGKILLed once a job is finished; torchrun then stops the other rank
    cache, out = tmp_path / "c3", tmp_path / "o3"
    run = _torchrun(cache, out)
    deadline = time.time() + 1200
    while not list(cache.glob("jobs/*/manifest.json")):
        assert run.poll() is None and time.time() < deadline, "the run ended before a job finished"
        time.sleep(0.2)
    os.kill(int((out / "pid-rank1").read_text()), signal.SIGKILL)
    log = run.communicate(timeout=600)[0]
    assert run.returncode != 0, log
    finished = _finished(cache)
    assert 1 <= len([k for k in finished if k.endswith("manifest.json")]) < 6, finished
    assert list((cache / "claims").glob("*.claim")), "the killed run left no claim behind: nothing was taken over"

    run = _torchrun(cache, out)  # the rerun completes ...
    log = run.communicate(timeout=1800)[0]
    assert run.returncode == 0, log
    res = np.load(out / "result.npz")
    assert np.array_equal(res["targets"], ref["targets"]) and np.array_equal(res["lds"], ref["lds"])
    after = _finished(cache)
    assert all(after[k] == v for k, v in finished.items()), "a finished job was recomputed"
    assert not list((cache / "claims").glob("*.claim"))


def test_claims_are_exclusive_and_dead_owners_are_taken_over(tmp_path):
    a, b = JobClaims(tmp_path, lease_s=60), JobClaims(tmp_path, lease_s=60)
    assert a.try_claim("job1") and not b.try_claim("job1")  # a live owner (this very process) keeps its claim
    a.release("job1")
    assert b.try_claim("job1")
    b.release("job1")
    # a claim left by a dead process on this host is taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "job2.claim").write_text('{"host": "%s", "pid": %d, "start": "1", "token": "t"}'
                                         % (a.host, int(dead.stdout)))
    assert a.try_claim("job2") and not b.try_claim("job2")
    # another host's claim: alive while its heartbeat is fresh, taken over once the lease has passed
    (tmp_path / "job3.claim").write_text('{"host": "elsewhere", "pid": 1, "start": "1", "token": "u"}')
    assert not a.try_claim("job3")
    old = time.time() - 120
    os.utime(tmp_path / "job3.claim", (old, old))
    assert b.try_claim("job3") and not a.try_claim("job3")
    with pytest.raises(ValueError, match="plain file name"):
        a.try_claim("../x")
    a.close()
    b.close()
    # drain: every item done exactly once, the ones done elsewhere are not redone
    done: set[int] = {1}
    ran: list[int] = []
    drain(range(5), str, done.__contains__, lambda i: (ran.append(i), done.add(i)), JobClaims(tmp_path / "d"),
          start=2)
    assert sorted(ran) == [0, 2, 3, 4] and ran[0] == 2
