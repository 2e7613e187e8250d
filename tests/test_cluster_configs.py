"""The deployment files in cluster/: what can be checked without the real systems."""

from __future__ import annotations

import importlib.util
import py_compile
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_job_script_from_our_config(tmp_path):
    pytest.importorskip("dask_jobqueue")
    import dask

    start = _load(CLUSTER / "slurm" / "start_cluster.py")
    with dask.config.set({}):  # keep the update local to this test
        cluster = start.make_cluster(
            CLUSTER / "slurm" / "jobqueue.yaml",
            0,
            None,
            scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
            log_directory=str(tmp_path),
        )
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert script.startswith("#!/usr/bin/env bash")
    assert "#SBATCH -J daskem-worker" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --mem=32G" in script
    assert "#SBATCH -t 04:00:00" in script
    assert "export OMP_NUM_THREADS=1" in script
    assert "--nworkers 8" in script and "--nthreads 1" in script
    assert "--memory-limit 4.00GiB" in script
    assert "tcp://127.0.0.1:" in script
    assert "distributed.cli.dask_worker" in script or "dask worker" in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "script",
    [
        "slurm/daskem-batch.sbatch",
        "local/start.sh",
        "local/stop.sh",
        "local/add-worker.sh",
        "local/env.sh",
        "tls/make-certs.sh",
    ],
)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)


def _key_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _key_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _key_paths(v, (*prefix, i))
    else:
        yield prefix


def test_kubernetes_manifest_matches_the_operator_spec():
    pytest.importorskip("dask_kubernetes")
    from dask_kubernetes.operator import make_cluster_spec

    ours = yaml.safe_load((CLUSTER / "kubernetes" / "daskcluster.yaml").read_text())
    ref = make_cluster_spec(
        name="daskem",
        image="daskem:latest",
        n_workers=4,
        resources={"limits": {"cpu": "1", "memory": "4Gi"}},
    )
    assert ours["apiVersion"] == ref["apiVersion"]
    assert ours["kind"] == ref["kind"] == "DaskCluster"
    assert ours["metadata"]["name"] == "daskem"
    # everything the operator's builder sets, our manifest sets too (env aside)
    ours_paths = set(_key_paths(ours))
    missing = [
        p for p in _key_paths(ref) if "env" not in p and "args" not in p and p not in ours_paths
    ]
    assert not missing, missing
    worker = ours["spec"]["worker"]["spec"]["containers"][0]
    scheduler = ours["spec"]["scheduler"]["spec"]["containers"][0]
    ref_worker = ref["spec"]["worker"]["spec"]["containers"][0]
    ref_sched = ref["spec"]["scheduler"]["spec"]["containers"][0]

    # the operator's builder still emits the old `dask-worker` / `dask-scheduler` commands,
    # which today's distributed no longer installs: ours use `dask worker` / `dask scheduler`
    def modern(args):
        head, *rest = args
        return head.split("-", 1) + rest if head in ("dask-worker", "dask-scheduler") else args

    assert worker["args"][:4] == modern(ref_worker["args"])[:4]
    assert scheduler["args"] == modern(ref_sched["args"])
    assert worker["ports"] == ref_worker["ports"]
    assert scheduler["ports"] == ref_sched["ports"]
    assert ours["spec"]["scheduler"]["service"] == ref["spec"]["scheduler"]["service"]
    assert worker["image"] == scheduler["image"]
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in worker["env"]
    i = worker["args"].index("--nthreads")
    assert worker["args"][i + 1] == "1"


def test_ssh_example_compiles():
    py_compile.compile(str(CLUSTER / "ssh" / "ssh_cluster.py"), doraise=True)


def _container_commands(manifest: dict) -> list[list[str]]:
    out = []
    for role in ("worker", "scheduler"):
        for c in manifest["spec"][role]["spec"]["containers"]:
            out.append(list(c.get("command", [])) + list(c.get("args", [])))
    return out


def test_kubernetes_commands_exist_in_todays_dask():
    """Every container command of the manifest is a command of the installed Dask (which
    has `dask worker` / `dask scheduler`, not the old `dask-worker` / `dask-scheduler`),
    and its --help runs."""
    import shutil
    import subprocess
    import sys

    manifest = yaml.safe_load((CLUSTER / "kubernetes" / "daskcluster.yaml").read_text())
    bindir = Path(sys.executable).parent
    for argv in _container_commands(manifest):
        exe = shutil.which(argv[0], path=str(bindir)) or shutil.which(argv[0])
        assert exe is not None, f"{argv[0]} is not an installed command"
        sub = [a for a in argv[1:2] if not a.startswith("-")]
        r = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (argv, r.stderr[-500:])
        assert "Usage" in r.stdout


def test_local_start_checks_python_first_and_prints_the_dashboard(tmp_path):
    import os
    import sys

    start, stop = CLUSTER / "local" / "start.sh", CLUSTER / "local" / "stop.sh"
    bad = subprocess.run(
        ["bash", str(start), "1", str(tmp_path / "bad")],
        env={**os.environ, "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "PYTHON=false cannot import daskem" in bad.stderr
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    ok = subprocess.run(
        ["bash", str(start), "1", str(run)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert ok.returncode == 0, ok.stderr
        assert "dashboard: http://127.0.0.1:" in ok.stdout
    finally:
        subprocess.run(["bash", str(stop), str(run)], capture_output=True, timeout=60)


def test_slurm_batch_script_runs_with_a_stub_srun_and_survives_a_requeue(tmp_path):
    """cluster/slurm/daskem-batch.sbatch run as SLURM would (its SLURM_* variables set,
    --mem-per-cpu: the case that used to abort under `set -u`) with a stub `srun` that
    starts the task's command once on this machine: it fits and predicts; run again (a
    requeue), it keeps both outputs; it leaves no process behind."""
    memory = "SLURM_MEM_PER_CPU"
    import os
    import sys

    from daskem.synthetic import make_stack, write_stack

    stack = tmp_path / "s.zarr"
    write_stack(make_stack((48, 48), seed=0), stack, chunks=24)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun = bindir / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        memory: "2000",
        "TMPDIR": str(tmp_path),
    }
    out = tmp_path / "out"
    script = CLUSTER / "slurm" / "daskem-batch.sbatch"
    args = ["bash", str(script), str(stack), "4", "labels", str(out)]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    model = (out / "model.json").read_text()
    assert (out / "posterior.zarr").is_dir()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "model.json").read_text() == model  # a requeue keeps the finished fit
    # the job stopped its cluster: no process of this job's scheduler file is left
    marker = f"{out}/scheduler-42.json".encode()
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:  # the process ended meanwhile
            pass
    assert left == [], left


@pytest.mark.parametrize(
    "flag, expected", [([], {}), (["--no-host-key-check"], {"known_hosts": None})]
)
def test_ssh_example_checks_host_keys_unless_told_not_to(monkeypatch, flag, expected):
    import sys

    import distributed

    seen = {}

    class Captured(Exception):
        pass

    def fake_cluster(hosts, **kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(distributed, "SSHCluster", fake_cluster)
    mod = _load(CLUSTER / "ssh" / "ssh_cluster.py")
    monkeypatch.setattr(sys, "argv", ["ssh_cluster.py", "h1", "--scheduler-file", "s.json", *flag])
    with pytest.raises(Captured):
        mod.main()
    assert seen["connect_options"] == expected


def test_dockerfile_pins_dask_and_distributed_together_and_serves_the_dashboard():
    import re

    text = (CLUSTER / "kubernetes" / "Dockerfile").read_text()
    arg = re.search(r"^ARG DASK_VERSION=(\S+)$", text, flags=re.M)
    assert arg, "the image pins dask's version with a build argument"
    assert '"dask[array]==${DASK_VERSION}"' in text
    assert '"distributed==${DASK_VERSION}"' in text
    assert '"bokeh>=3.1"' in text  # the dashboard page needs it
    assert "--build-arg DASK_VERSION=" in (CLUSTER / "README.md").read_text()
