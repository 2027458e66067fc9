"""The namespace cluster harness leaves nothing behind: a cluster whose owner gets SIGTERM stops itself; one whose
owner is SIGKILLed (nothing runs in it any more) is removed by the next harness start, by the pids in its
namespaces. Each case starts ``python -m tests.cluster.netns up --workers 0`` (a head node and the S3 server)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.netns import REPO, STATE_DIR, clean_leftovers, namespaces_problem, netns_pids

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _netns() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_cluster_is_removed_however_its_owner_ends(sig: signal.Signals) -> None:
    problem = namespaces_problem()
    if problem:
        pytest.skip(f"no multi-node cluster on this machine: {problem}")
    owner = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.netns", "up", "--workers", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        for line in owner.stdout:  # the last line it prints once the cluster is up
            if line.startswith("Ctrl-C stops it"):
                break
        else:
            pytest.fail(f"the cluster did not come up: {owner.communicate(timeout=60)[1][-2000:]}")
        (state,) = [s for p in STATE_DIR.glob("*.json") if (s := json.loads(p.read_text()))["owner"] == owner.pid]
        pids = [pid for name in state["netns"] for pid in netns_pids(name)]
        assert len(pids) > 10, "Ray's head, its agents and the S3 server run in the namespaces"
        assert set(state["netns"]) <= set(_netns()) and _link_exists(state["link"])

        owner.send_signal(sig)
        assert owner.wait(timeout=120) == -sig
        if sig == signal.SIGKILL:
            assert any(_alive(pid) for pid in pids), "a SIGKILLed owner cannot stop its cluster"
            assert set(state["netns"]) <= set(clean_leftovers())
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.communicate()
    left = [pid for pid in pids if _alive(pid)]
    assert not left, f"processes left: {left}"
    assert not set(state["netns"]) & set(_netns()), _netns()
    assert not _link_exists(state["link"])
    assert not any(json.loads(p.read_text())["owner"] == owner.pid for p in STATE_DIR.glob("*.json"))
