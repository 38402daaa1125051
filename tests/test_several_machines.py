"""Beyond one machine, with real services: a Ray-dispatched sweep reporting to an `mlflow server`
on PostgreSQL (one of its Ray workers killed, as when a node is lost), and one experiment whose
trainers live in network namespaces of their own, so tensors really cross network interfaces."""

from __future__ import annotations

import glob
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, fedshard, fedshard_processes

SWEEP = str(REPO / "sweep.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(data_dir) -> list[str]:
    return ["-P", f"data_dir={data_dir}", "-P", "max_train_samples=16", "-P", "max_test_samples=16",
            "-P", "batch_size=16", "-P", "local_epochs=1"]


# --------------------------------------------------------------------------- options (no processes)


@pytest.mark.parametrize("args, message", [
    (["sweep", "--ray-address", "10.0.0.1:6379"], "--ray-address, --cpus-per-experiment and --gpus-per-experiment "
                                                  "apply to --executor ray"),
    (["sweep", "--executor", "ray", "--gpus-per-experiment", "1.5"], "a share of one GPU (<= 1) or whole GPUs"),
    (["run", "--remote-trainers"], "--remote-trainers needs --metaserver-host ADDRESS"),
])
def test_bad_placement_options_exit_2_before_anything_starts(shared_store, args, message):
    from click.testing import CliRunner

    from fedshard import cli

    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_gloo_uses_the_interface_towards_the_metaserver_unless_gloo_socket_ifname_names_one(monkeypatch):
    """What transport.join does before every role's process group forms, with a real TCPStore and
    a one-process gloo group (a tenth of a second): gloo is pointed at the interface this machine
    reaches the metaserver through, and a GLOO_SOCKET_IFNAME a person set is left as it is."""
    import torch
    import torch.distributed as dist

    from fedshard import transport
    from fedshard.transport import interface_towards

    assert interface_towards("127.0.0.1") == "lo"

    def form_group() -> None:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
        transport.join(store, transport.AGGREGATOR, 1, 30, f"127.0.0.1:{store.port}")
        try:
            dist.all_reduce(torch.ones(1))
        finally:
            transport.leave()

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")  # unset for join; monkeypatch restores the real value after
    form_group()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"  # the loopback interface, towards a 127.0.0.1 metaserver
    # A person's choice stands and gloo honours it: were it replaced by "lo", this group would form.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuchif0")
    with pytest.raises(RuntimeError, match="nosuchif0"):
        form_group()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "nosuchif0"


# --------------------------------------------------------------------------- PostgreSQL + mlflow server


@pytest.fixture(scope="module")
def tracking_server():
    """PostgreSQL from Debian's packages in a temporary directory, and an `mlflow server` on it,
    both on loopback; stopped (and deleted) after the module's tests."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        pytest.fail("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
                    "apt-get install postgresql (.ci/run does)")
    bin_dir = Path(initdbs[-1]).parent
    # PostgreSQL refuses to run as root: as root, run it as the postgres user, in a directory it owns.
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="fedshard-pg-"))
    if as_pg:
        shutil.chown(root, "postgres")
    pg_port, http_port = free_port(), free_port()
    pg_ctl = [*as_pg, str(bin_dir / "pg_ctl"), "-D", str(root / "data")]
    server = None
    try:
        subprocess.run([*as_pg, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "fedshard", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        subprocess.run([*pg_ctl, "-l", str(root / "postgres.log"), "-w", "start", "-o",
                        f"-p {pg_port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"],
                       check=True, capture_output=True)
        subprocess.run([*as_pg, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "fedshard",
                        "mlflow"], check=True, capture_output=True)
        dsn = f"postgresql://fedshard@127.0.0.1:{pg_port}/mlflow"
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        log = (root / "mlflow-server.log").open("wb")
        # No job runner: it serves GenAI features, and its processes would only slow the test down.
        server = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", dsn.replace("postgresql://", "postgresql+psycopg://"),
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(http_port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        uri = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 150
        while True:
            assert server.poll() is None, (root / "mlflow-server.log").read_text()
            assert time.monotonic() < deadline, (root / "mlflow-server.log").read_text()
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield {"uri": uri, "dsn": dsn}
    finally:
        if server is not None:  # the server and the worker it started share its process group
            with suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                server.wait(timeout=15)
            with suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def ray_worker_of(run_id: str) -> psutil.Process | None:
    """The Ray worker process running this experiment's launcher (the aggregator's grandparent)."""
    for proc in fedshard_processes(f"--run-id {run_id}"):
        try:
            if " aggregator " in " ".join(proc.cmdline()):
                worker = proc.parent().parent()
                return worker if "ray" in " ".join(worker.cmdline()).lower() else None
        except (psutil.NoSuchProcess, AttributeError):  # gone meanwhile, or no parent any more
            return None
    return None


def test_ray_sweep_reports_to_mlflow_server_on_postgres_and_survives_a_lost_worker(
        tmp_path, data_dir, tracking_server, monkeypatch):
    import psycopg

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # Launcher work directories under the test's directory (found by the leftover check below);
    # Ray's own sockets under /tmp, as their paths must stay short.
    env = dict(os.environ, TMPDIR=str(tmp_path), RAY_TMPDIR="/tmp")
    # World size 2 on this 2-core machine, with no resource flags: each experiment asks Ray for 1 CPU
    # (world_size + 1 capped at the cluster's CPUs / --parallel), so both run at once.
    grid = ["--world-sizes", "2", "--learning-rates", "1e-4,1e-3", "--swap", "false", "--rounds", "1", "--seeds", "7",
            *tiny(data_dir), "--experiment-name", "ray-pg"]
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, SWEEP, *grid, "--executor", "ray", "--parallel", "2"],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    client = MlflowClient()
    try:
        # As soon as one experiment runs, kill the Ray worker that runs it: what a lost node does.
        deadline, worker, victim = time.monotonic() + 180, None, None
        while worker is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            exp = client.get_experiment_by_name("ray-pg")
            for run in client.search_runs([exp.experiment_id]) if exp else []:
                if run.info.status == "RUNNING" and run.data.tags.get("fedshard.sweep") != "true":
                    worker, victim = ray_worker_of(run.info.run_id), run.info.run_id
                    if worker:
                        break
            time.sleep(0.2)
        worker.kill()
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert code == 0, out
    assert "Executor: a local Ray instance: 1 node(s)" in out
    assert "Each experiment asks for 1 CPUs" in out
    assert "Total experiments to run: 2 (0 already finished)" in out
    assert re.search(r"Experiment failed: \(2, 0\.00?01, False, 1, 7\): Ray task failed: \w+Error: .*will retry",
                     out), out
    assert "View run" not in out  # MLflow's links to runs do not interleave with the sweep's output
    assert "=== Retrying experiment" in out and "Finished: 2\nFailed: 0\n" in out
    assert fedshard_processes(str(tmp_path)) == []

    exp = client.get_experiment_by_name("ray-pg")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("fedshard.sweep") == "true"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    lost = client.get_run(victim)
    assert lost.info.status in ("FAILED", "KILLED")
    assert lost.data.tags["fedshard.failure_reason"], lost.data.tags
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(float(r.data.params["learning_rate"]) for r in finished) == [1e-4, 1e-3]
    for run in finished:  # every process reported to the server: sweep, launcher, aggregator
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [0, 1]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "logs"}
        assert len(run.outputs.model_outputs) == 1  # the final model, uploaded through the server
    with psycopg.connect(tracking_server["dsn"]) as db:  # and the server keeps it all in PostgreSQL
        statuses = db.execute("SELECT status FROM runs WHERE experiment_id = %s",
                              (int(exp.experiment_id),)).fetchall()
    assert sorted(s for (s,) in statuses) == sorted(r.info.status for r in runs)

    exported = fedshard("export", "--experiment-name", "ray-pg", "--output", "results.pkl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "Exported 2 finished runs (2 configurations)" in exported.stdout and exported.stderr == ""
    results = pickle.loads((tmp_path / "results.pkl").read_bytes())
    assert sorted(results) == [(2, 0.0001, False, 1, 7), (2, 0.001, False, 1, 7)]
    assert all([r for r, _, _ in entries] == [0, 1] for entries in results.values())


# --------------------------------------------------------------------------- network namespaces

SUBNET = "10.213"  # addresses exist only inside this test's namespaces


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def namespaces():
    """The aggregator's namespace and one per trainer, each trainer joined to the aggregator's by
    a veth pair with a /30 of its own: trainer k is SUBNET.k.2 on `tk`, the aggregator SUBNET.k.1
    on `ak`, and trainer k's default route goes over its veth. The aggregator's namespace routes
    between the trainers too: gloo connects every pair of ranks, trainers included."""
    tag = os.getpid()
    agg, trainers = f"fsagg{tag}", [f"fstr{tag}-{k}" for k in range(2)]
    try:
        ip("netns", "add", agg)
    except subprocess.CalledProcessError as exc:
        if "permission" in exc.stderr.lower() or "not permitted" in exc.stderr.lower():
            pytest.skip(f"network namespaces not permitted here: {exc.stderr.strip()}; run as root, "
                        f"see docs/several-machines.md")
        raise
    created = [agg]
    try:
        ip("-n", agg, "link", "set", "lo", "up")
        ip("netns", "exec", agg, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")  # this namespace only
        for k, ns in enumerate(trainers):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", agg, "link", "add", f"a{k}", "type", "veth", "peer", "name", f"t{k}", "netns", ns)
            ip("-n", agg, "addr", "add", f"{SUBNET}.{k}.1/30", "dev", f"a{k}")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{k}.2/30", "dev", f"t{k}")
            ip("-n", agg, "link", "set", f"a{k}", "up")
            ip("-n", ns, "link", "set", f"t{k}", "up")
            ip("-n", ns, "route", "add", "default", "via", f"{SUBNET}.{k}.1")
        yield agg, trainers
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def interface_bytes(ns: str, interface: str) -> tuple[int, int]:
    """(received, sent) bytes of an interface, as its own namespace counts them."""
    stats = [subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{interface}/statistics/{name}"],
                            check=True, capture_output=True, text=True).stdout for name in ("rx_bytes", "tx_bytes")]
    return int(stats[0]), int(stats[1])


def slice_bytes(world_size: int) -> int:
    """float32 bytes of the smallest slice a trainer of this experiment receives and sends back."""
    import torch

    from fedshard import models, strategies
    from fedshard.config import ExperimentConfig

    cfg = ExperimentConfig(world_size=world_size)
    with torch.device("meta"):
        nets = [models.get(cfg.model).network(strategies.build(cfg).widths(part)) for part in range(world_size)]
    return min(4 * sum(p.numel() for p in m.parameters()) for m in nets)


def test_trainers_in_their_own_network_namespaces_exchange_tensors_over_veth(tmp_path, data_dir, store, namespaces):
    agg, trainer_ns = namespaces
    address = f"{SUBNET}.0.1"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("GLOO_SOCKET_IFNAME", None)  # each role finds the interface towards the metaserver itself
    launcher = subprocess.Popen(
        ["ip", "netns", "exec", agg, sys.executable, "-m", "fedshard", "run", "--remote-trainers",
         "--metaserver-host", address, "--join-timeout", "120", "--world-size", "2", "--enable-swapping", "true",
         "--rounds", "1", "--data-dir", str(data_dir), "--max-train-samples", "32", "--max-test-samples", "16",
         "--batch-size", "16", "--experiment-name", "netns"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    trainers: list[subprocess.Popen] = []
    lines, commands = [], []
    try:
        for line in launcher.stdout:  # the launcher prints one command per trainer, then waits for them
            lines.append(line)
            if line.startswith("  fedshard trainer "):
                commands.append(shlex.split(line))
                if len(commands) == 2:
                    break
        assert len(commands) == 2, "".join(lines)
        assert all(c[c.index("--metaserver") + 1].startswith(f"{address}:") and "--secret" in c for c in commands)
        before = [interface_bytes(ns, f"t{k}") for k, ns in enumerate(trainer_ns)]
        for k, (ns, command) in enumerate(zip(trainer_ns, commands)):
            assert command[command.index("--rank") + 1] == str(k)
            trainers.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "fedshard",
                                              *command[1:]], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True))
        rest, _ = launcher.communicate(timeout=240)
        lines.append(rest)
        outputs = [t.communicate(timeout=30)[0] for t in trainers]
    finally:
        for p in [launcher, *trainers]:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = "".join(lines)
    assert launcher.returncode == 0, out + "".join(outputs)
    assert all(t.returncode == 0 for t in trainers), outputs
    assert "aggregator: trainer 0 joined" in out and "aggregator: trainer 1 joined" in out
    run_id = re.search(r"fedshard: run ([0-9a-f]{32}) FINISHED", out).group(1)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "test_accuracy")] == [0, 1]
    # Each trainer received a slice and sent one back through its own veth.
    size = slice_bytes(2)
    for k, ns in enumerate(trainer_ns):
        rx, tx = (after - start for after, start in zip(interface_bytes(ns, f"t{k}"), before[k]))
        assert rx > size and tx > size, (k, rx, tx, size)
    assert fedshard_processes(str(tmp_path)) == []
