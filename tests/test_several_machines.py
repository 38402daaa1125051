"""Beyond one machine, with real services: a Ray-dispatched sweep reporting to an `mlflow server`
on PostgreSQL (one of its Ray workers killed, as when a node is lost), and one experiment whose
trainers live in network namespaces of their own, so tensors really cross network interfaces."""

from __future__ import annotations

import contextlib
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

from fedshard import tracking
from helpers import CONFIG, REPO, claim_race, fedshard, fedshard_processes, history

pytestmark = pytest.mark.slow  # every test here starts processes

SWEEP = str(REPO / "sweep.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(data_dir) -> list[str]:
    return [
        "-P",
        f"data_dir={data_dir}",
        "-P",
        "max_train_samples=16",
        "-P",
        "max_test_samples=16",
        "-P",
        "batch_size=16",
        "-P",
        "local_epochs=1",
    ]


# --------------------------------------------------------------------------- options (no processes)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["sweep", "--ray-address", "10.0.0.1:6379"],
            "--ray-address, --cpus-per-experiment and --gpus-per-experiment apply to --executor ray",
        ),
        (["sweep", "--executor", "ray", "--gpus-per-experiment", "1.5"], "a share of one GPU (<= 1) or whole GPUs"),
        (["run", "--remote-trainers"], "--remote-trainers needs --metaserver-host ADDRESS"),
    ],
)
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

    from fedshard.runtime import transport
    from fedshard.runtime.transport import interface_towards

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
        pytest.fail(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
            "apt-get install postgresql (.ci/run does)"
        )
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
        subprocess.run(
            [
                *as_pg,
                str(bin_dir / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                "fedshard",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *pg_ctl,
                "-l",
                str(root / "postgres.log"),
                "-w",
                "start",
                "-o",
                f"-p {pg_port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*as_pg, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "fedshard", "mlflow"],
            check=True,
            capture_output=True,
        )
        dsn = f"postgresql://fedshard@127.0.0.1:{pg_port}/mlflow"
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        log = (root / "mlflow-server.log").open("wb")
        # No job runner: it serves GenAI features, and its processes would only slow the test down.
        server = subprocess.Popen(
            [
                mlflow,
                "server",
                "--backend-store-uri",
                dsn.replace("postgresql://", "postgresql+psycopg://"),
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(http_port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )
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
    tmp_path, data_dir, tracking_server, monkeypatch
):
    import psycopg

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # Launcher work directories under the test's directory (found by the leftover check below);
    # Ray's own sockets under /tmp, as their paths must stay short.
    env = dict(os.environ, TMPDIR=str(tmp_path), RAY_TMPDIR="/tmp")
    # World size 2 on this 2-core machine, with no resource flags: each experiment asks Ray for 1 CPU
    # (world_size + 1 capped at the cluster's CPUs / --parallel), so both run at once.
    grid = [
        "--world-sizes",
        "2",
        "--learning-rates",
        "1e-4,1e-3",
        "--swap",
        "false",
        "--rounds",
        "1",
        "--seeds",
        "7",
        *tiny(data_dir),
        "--experiment-name",
        "ray-pg",
    ]
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, SWEEP, *grid, "--executor", "ray", "--parallel", "2"],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
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
    assert re.search(
        r"Experiment failed: \(2, 0\.00?01, False, 1, 7\): Ray task failed: \w+Error: .*will retry", out
    ), out
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
        statuses = db.execute("SELECT status FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),)).fetchall()
    assert sorted(s for (s,) in statuses) == sorted(r.info.status for r in runs)

    exported = fedshard("export", "--experiment-name", "ray-pg", "--output", "results.pkl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "Exported 2 finished runs (2 configurations)" in exported.stdout and exported.stderr == ""
    results = pickle.loads((tmp_path / "results.pkl").read_bytes())
    assert sorted(results) == [(2, 0.0001, False, 1, 7), (2, 0.001, False, 1, 7)]
    assert all([r for r, _, _ in entries] == [0, 1] for entries in results.values())


# --------------------------------------------------------------------------- claims through the server


def test_sweeps_released_at_the_same_instant_claim_each_configuration_once_through_the_server(tracking_server):
    """The claim race of tests/test_sweep.py, through the `mlflow server` on PostgreSQL: three processes,
    five times, exactly one wins; the losers' claims are withdrawn."""
    outcomes = claim_race(tracking_server["uri"], "race-pg", racers=3, rounds=5)
    for r in range(5):
        (winner,) = [run for rnd, kind, run in outcomes if rnd == r and kind == "Claimed"]
        assert sorted((kind, run) for rnd, kind, run in outcomes if rnd == r) == [
            ("Claimed", winner),
            ("Held", winner),
            ("Held", winner),
        ]
    client = MlflowClient(tracking_server["uri"])
    exp_id = client.get_experiment_by_name("race-pg").experiment_id
    kept = [r for r in client.search_runs([exp_id]) if r.data.tags.get("fedshard.sweep") != "true"]
    assert sorted(r.info.run_id for r in kept) == sorted(run for _, kind, run in outcomes if kind == "Claimed")
    assert {r.info.status for r in kept} == {"FINISHED"}


def experiment_runs(experiment: str):
    """The experiment's runs that are no sweep's own (none when it does not exist yet)."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    runs = MlflowClient().search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if r.data.tags.get("fedshard.sweep") != "true"]


def assert_gone(marker: str, timeout: float = 30) -> None:
    """No process with `marker` on its command line within `timeout` (the kernel delivers the
    parent-death signals of the killed ones' children a moment later)."""
    deadline = time.monotonic() + timeout
    while (left := fedshard_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], left


TIMEOUT = "5"  # the claim timeout of these sweeps: seconds of silence after which a claim is dead


def family(pid: int) -> list[psutil.Process]:
    """A sweep and every process below it (its launchers and their roles)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """`sig` to every process at once, the sweep first: as when a machine goes down (SIGKILL) or is
    suspended (SIGSTOP, then SIGCONT), so that none of them reacts to another's end first."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def owning_sweep(run_id: str, sweeps: dict, timeout: float = 240) -> tuple[str, int]:
    """Which of `sweeps` (name -> Popen) took the run over: its launcher (the run's owner, on this
    host) is their child and has started the run's aggregator. Returns (name, launcher pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tags = tracking.run_record(run_id).tags
        with contextlib.suppress(psutil.NoSuchProcess, ValueError):
            launcher = psutil.Process(int(tags.get(tracking.PID_TAG, 0)))
            owners = [name for name, p in sweeps.items() if launcher.ppid() == p.pid]
            roles = [p for p in fedshard_processes(f"--run-id {run_id}") if p.ppid() == launcher.pid]
            if (
                owners
                and tags.get(tracking.HOST_TAG) == tracking.host()
                and any(" aggregator " in " ".join(p.cmdline()) for p in roles)
            ):
                return owners[0], launcher.pid
        assert all(p.poll() is None for p in sweeps.values()), {n: p.poll() for n, p in sweeps.items()}
        time.sleep(0.1)
    raise AssertionError(f"no sweep took run {run_id} over")


def test_a_lost_sweep_leaves_a_claim_taken_over_after_the_timeout_and_a_paused_owner_stops(
    tmp_path, data_dir, tracking_server, reference, monkeypatch
):
    """Rounds 1 and 3 of one configuration: the 3-round run starts from the 1-round run's final model.
    Once it stored round 2, its sweep and launcher are SIGKILLed together, as when their machine is
    lost (it called itself node-a: its claim is judged by its heartbeat alone). Two sweeps with --wait
    started together find the configuration running elsewhere; once the claim is older than the
    timeout, exactly one takes it over and resumes it from round 2. That one is SIGSTOPped mid-round,
    past the timeout: the other takes the run over and finishes it. SIGCONT: the paused launcher finds
    its run taken and stops without ending it, and its sweep reports the result. The history is an
    uninterrupted run's, each round once. Through the PostgreSQL tracking server, as several machines
    would share it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    link = tmp_path / "data"
    link.symlink_to(data_dir, target_is_directory=True)
    params = {k: v for k, v in CONFIG.items() if k not in ("world_size", "rounds", "learning_rate", "enable_swapping")}
    grid = [
        "--world-sizes",
        "2",
        "--learning-rates",
        "1e-3",
        "--swap",
        "true",
        "--rounds",
        "1,3",
        "--seeds",
        "123",
        "-P",
        f"data_dir={link}",
        *[a for k, v in params.items() for a in ("-P", f"{k}={v}")],
        "--experiment-name",
        "ext",
        "--no-progress",
        "--claim-timeout",
        TIMEOUT,
    ]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    # A run whose owner vanished without a trace: RUNNING, owned by a pid of node-a that is gone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    ghost = (
        MlflowClient()
        .create_run(
            tracking.experiment_id("ext"),
            tags={
                **tracking.owner_tags(),
                tracking.HOST_TAG: "node-a",
                tracking.PID_TAG: str(dead.pid),
                "fedshard.sweep": "true",
            },
        )
        .info.run_id
    )
    lost = subprocess.Popen(
        [sys.executable, str(REPO / "sweep.py"), *grid],
        cwd=tmp_path,
        env={**env, "FEDSHARD_HOST": "node-a"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (
        longer := [
            r
            for r in experiment_runs("ext")
            if r.data.params.get("rounds") == "3" and tracking.run_record(r.info.run_id).checkpoint_round >= 2
        ]
    ):
        assert lost.poll() is None and time.monotonic() < deadline, lost.communicate()[0]
        time.sleep(0.1)
    run_id = longer[0].info.run_id
    signal_all(family(lost.pid), signal.SIGKILL)
    first = lost.communicate()[0]
    assert_gone(str(tmp_path))
    assert "Rounds to train: 3 (4 without extending shorter runs)" in first
    assert f"Marked 1 stale RUNNING run(s) KILLED (their sweep or launcher on this host is gone): {ghost}" in first
    left = tracking.run_record(run_id)
    assert left.status == "RUNNING" and left.tags[tracking.HOST_TAG] == "node-a"  # a claim nobody renews

    sweeps = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "sweep.py"), *grid, "--wait"],
            cwd=tmp_path,
            env=env,
            stdout=(tmp_path / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for name in ("B", "C")
    }
    try:
        paused, stale_launcher = owning_sweep(run_id, sweeps)
        signal_all(family(sweeps[paused].pid), signal.SIGSTOP)
        stopped_at = tracking.run_record(run_id)
        deadline = time.monotonic() + 240
        while (status := tracking.run_status(run_id)) != "FINISHED":
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        signal_all(family(sweeps[paused].pid), signal.SIGCONT)
        codes = {name: p.wait(timeout=120) for name, p in sweeps.items()}
    finally:
        for p in sweeps.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                signal_all(family(p.pid), signal.SIGCONT)
            if p.poll() is None:
                p.kill()
                p.wait()
    out = {name: (tmp_path / f"{name}.log").read_text() for name in sweeps}
    (other,) = set(sweeps) - {paused}
    assert codes == {"B": 0, "C": 0}, out
    assert_gone(str(tmp_path))
    assert_taken_over_in_turn(run_id, out, paused, other, stopped_at, stale_launcher)

    short, long_ = sorted(
        experiment_runs("ext"), key=lambda r: int(r.data.params["rounds"])
    )  # withdrawn claims: deleted
    assert short.info.status == long_.info.status == "FINISHED" and long_.info.run_id == run_id
    assert short.data.tags[tracking.ROUNDS_TRAINED_TAG] == "1"
    assert long_.data.tags[tracking.EXTENDS_TAG] == short.info.run_id
    assert long_.data.tags[tracking.ROUNDS_TRAINED_TAG] == "2"  # rounds 2 and 3; round 1 is the twin's
    assert long_.data.tags[tracking.RESUMED_TAG] == "2"
    assert history(run_id) == reference  # extended, lost, taken over twice: as if run in one go
    assert history(short.info.run_id) == {k: {r: v for r, v in h.items() if r <= 1} for k, h in reference.items()}


def assert_taken_over_in_turn(run_id: str, out: dict, paused: str, other: str, stopped_at, stale_launcher: int):
    """Both waiting sweeps saw the configuration running on node-a; one took the run over once the claim
    was dead, was paused, and the other took it over from it and finished it; the paused launcher never
    ended the run, and its sweep counts the other's result as its own."""
    key = "(2, 0.001, True, 3, 123)"
    assert f"Experiment running elsewhere: {key} (run {run_id}, pid " in out[other], out[other]
    assert f"Experiment no longer held elsewhere: {key} (run {run_id} went silent); claiming it here" in out[other]
    assert (
        f"Resuming experiment: world_size=2, lr=0.001, swap=True, rounds=3, seed=123 from round 2 (run {run_id})"
        in out[other]
    ), out[other]
    assert f"Experiment completed successfully: {key}" in out[other]
    assert f"Experiment taken over elsewhere: {key}: its launcher here was silent past the claim timeout" in out[paused]
    assert f"Experiment completed elsewhere: {key} (run {run_id})" in out[paused]
    assert "Finished: 1\nFailed: 0\n" in out[paused] and "Finished: 1\nFailed: 0\n" in out[other]
    # The hands the run changed by: node-a's claim taken (reaped, then resumed, or resumed at once), the
    # paused owner's likewise, then finished by the last owner; the paused launcher ended nothing.
    hands = {
        int(k.rsplit(".", 1)[1]): v
        for k, v in MlflowClient().get_run(run_id).data.params.items()
        if k.startswith("fedshard.claim.")
    }
    words = [hands[n].split(";")[0].split(":")[0].split(" by ")[0] for n in sorted(hands)]
    assert sorted(hands) == list(range(1, len(hands) + 1)) and words[-1] == "finished", hands
    assert words.count("resumed") == 2 and set(words[:-1]) <= {"reaped", "resumed"}, hands
    taken = tracking.claims.hands(stopped_at)
    assert words[taken - 1] == "resumed" and words[taken] in ("reaped", "resumed"), hands  # from the paused owner
    assert not any(v.rsplit("; ", 1)[1].startswith(f"pid {stale_launcher} on") for v in hands.values())  # taken by


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
            pytest.skip(
                f"network namespaces not permitted here: {exc.stderr.strip()}; run as root, "
                f"see docs/several-machines.md"
            )
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
    stats = [
        subprocess.run(
            ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{interface}/statistics/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for name in ("rx_bytes", "tx_bytes")
    ]
    return int(stats[0]), int(stats[1])


def slice_bytes(world_size: int) -> int:
    """float32 bytes of the smallest slice a trainer of this experiment receives and sends back."""
    import torch

    from fedshard.core import models, strategies
    from fedshard.core.config import ExperimentConfig

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
        [
            "ip",
            "netns",
            "exec",
            agg,
            sys.executable,
            "-m",
            "fedshard",
            "run",
            "--remote-trainers",
            "--metaserver-host",
            address,
            "--join-timeout",
            "120",
            "--world-size",
            "2",
            "--enable-swapping",
            "true",
            "--rounds",
            "1",
            "--data-dir",
            str(data_dir),
            "--max-train-samples",
            "32",
            "--max-test-samples",
            "16",
            "--batch-size",
            "16",
            "--experiment-name",
            "netns",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
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
            trainers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "fedshard", *command[1:]],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
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
