"""Labels at any density on real scheduler and worker processes: the client's memory does
not grow with the number of labelled pixels (the labels are summarised on the workers,
daskem.engine.prepare), and no large graph is sent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _procs import LocalProcesses

pytestmark = pytest.mark.cluster

CLIENT = Path(__file__).with_name("label_density_client.py")
N_PIXELS = 2**21  # 2 M pixels x 3 attributes; fully labelled: 2 M labelled pixels


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    procs = LocalProcesses(tmp_path_factory.mktemp("run"), 2)
    try:
        yield procs.address
    finally:
        procs.stop()


def _fit(address: str, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(CLIENT), address, mode, str(N_PIXELS)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fully_labelled_stack_keeps_the_client_flat(cluster):
    few = _fit(cluster, "few")
    every = _fit(cluster, "every")
    # the client's peak resident memory, fully labelled against 100 labelled pixels (with
    # the labelled rows brought to the client it was 2.5x at 4 M pixels: 524 / 211 MiB)
    assert every["peak_mib"] <= 1.5 * few["peak_mib"], (every["peak_mib"], few["peak_mib"])
    for run in (few, every):
        assert not [w for w in run["warnings"] if "large graph" in w], run["warnings"]
    # and the fully labelled fit is the class statistics' fixed point, not garbage
    means = np.asarray(every["means"])
    assert np.allclose(np.sort(means[:, 0]), [0.0, 0.0, 4.0], atol=0.3)
