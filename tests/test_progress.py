"""progress.py: what the relayed reports of the trainers mean (steps, images/s, ETAs, silence),
the launcher's display of them, and the round-trip through a real rendezvous store. The lines a
real run prints are checked in test_experiment.py, a silent trainer in test_faults.py."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from fedshard.runtime import progress

NOW = 1_000_000.0


def state(**trainers) -> dict:
    """Round 2 of 5 of two trainers, started 10 s ago."""
    return {
        "round": 2,
        "rounds": 5,
        "world_size": 2,
        "round_started": NOW - 10,
        "silent_after": 30.0,
        "trainers": {k[1:]: t for k, t in trainers.items()},
    }


def report(round_=2, done=4, total=10, images=32, seconds=8.0, heard=NOW - 1):
    return {"round": round_, "done": done, "total": total, "images": images, "seconds": seconds, "heard": heard}


def test_figures_are_the_steps_of_all_trainers_their_speed_and_the_slowest_eta():
    f = progress.figures(
        state(t0=report(done=4, total=10, images=32, seconds=8.0), t1=report(done=6, total=10, images=48, seconds=8.0)),
        now=NOW,
    )
    assert (f.round, f.rounds, f.done, f.total) == (2, 5, 10, 20)
    assert f.images_per_s == pytest.approx(32 / 8 + 48 / 8)
    assert f.eta_round == pytest.approx(6 * 8 / 4)  # trainer 0: 6 steps left at 2 s a step
    assert f.pace == pytest.approx(10 + 12) and f.eta_run == pytest.approx(12 + 3 * 22)
    assert f.line() == "round 2/5: steps 10/20 (50%), 10 img/s, ETA 0:12 (run 1:18)" and f.news


def test_no_line_until_every_trainer_has_stepped_in_the_round():
    # trainer 1 still waits for its weights: 1 step of 10 + ? is no figure to print
    one = progress.figures(state(t0=report(done=1, total=10, seconds=0.5), t1=report(round_=1, done=10)), now=NOW)
    assert (one.done, one.total, one.eta_round, one.news) == (1, 10, None, False)
    both = progress.figures(state(t0=report(done=1, total=10, seconds=0.5), t1=report(done=1, total=10)), now=NOW)
    assert (both.done, both.total, both.news) == (2, 20, True)


def test_a_trainer_not_heard_from_is_silent_and_one_that_waits_is_not():
    late = progress.figures(
        state(
            t0=report(done=10, total=10, heard=NOW + 20),  # done, waiting, still beating
            t1=report(round_=1, done=10, total=10, heard=NOW - 100),
        ),
        now=NOW + 25,
    )
    assert late.silent == ((1, 35.0),)  # since round 2 began, not since it last spoke in round 1
    assert late.line().endswith("; trainer 1 silent for 35s") and late.eta_round is None
    stopped = progress.figures(
        state(
            t0=report(done=10, total=10, heard=NOW - 5),  # finished its steps, then
            t1=report(),
        ),
        now=NOW + 30,
    )  # stopped before its result arrived
    assert [k for k, _ in stopped.silent] == [0, 1]
    nobody = progress.figures(state(), now=NOW + 25)
    assert nobody.line() == "round 2/5: no steps reported yet; trainer 0 silent for 35s; trainer 1 silent for 35s"
    assert progress.figures(state(t0=report(), t1=report()), now=NOW).silent == ()
    assert progress.figures(None) is None and progress.figures({"round": 0}) is None
    assert progress.figures({**state(), "closed": True}, now=NOW + 25) is None  # the rounds are over


@pytest.mark.slow
def test_the_display_prints_a_line_every_so_often_when_not_on_a_terminal(tmp_path):
    path = tmp_path / "progress.json"
    path.write_text(json.dumps({**state(t0=report(), t1=report()), "round_started": time.time() - 10}))
    lines = []
    display = progress.Display(path, every=0.01, echo=lines.append)
    assert not display.live  # pytest's captured stderr is no terminal
    for _ in range(2):  # the first line comes `every` seconds on; the file is read at most once a second
        time.sleep(progress.REPORT_SECONDS + 0.1)
        display.tick()
    assert len(lines) == 2 and lines[0].startswith("round 2/5: steps 8/20 (40%), 8 img/s, ETA ")
    quiet = progress.Display(path, every=0, echo=lines.append)
    quiet.tick()
    assert len(lines) == 2  # 0 turns it off


def relayed(path, ready, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (got := progress.read(path)) is None or not ready(got):
        assert time.monotonic() < deadline, f"the relay did not write what was expected: {got}"
        time.sleep(0.1)
    return got


@pytest.mark.slow
def test_trainer_reports_and_beats_reach_the_relays_file_through_a_real_store(tmp_path):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    path = tmp_path / "progress.json"
    relay = progress.Relay(server, path, world_size=1, rounds=3, round_timeout=12).start()
    reporter = progress.TrainerReporter(server, 0, batch_size=8)
    try:
        relay.round_started(1)
        reporter.round_started(1, images=20)
        for done in (1, 2, 3):
            reporter(done, 3)
        got = relayed(path, lambda s: s["trainers"] and s["trainers"]["0"]["done"] == 3)
        (t,) = got["trainers"].values()
        assert (got["round"], got["silent_after"], t["round"], t["done"], t["total"], t["images"]) == (
            1,
            4.0,
            1,
            3,
            3,
            20,
        )
        # no step for a while (waiting for the next round): the beat goes on, so it is heard
        later = relayed(path, lambda s: s["trainers"]["0"]["beat"] >= t["beat"] + 2)
        assert later["trainers"]["0"]["heard"] > t["heard"] and later["trainers"]["0"]["done"] == 3
    finally:
        reporter.close()
        relay.close()
    assert progress.read(path)["closed"] and progress.figures(progress.read(path)) is None


def test_the_sweep_says_each_experiments_steps_and_bases_its_eta_on_them(tmp_path):
    """A sweep with one experiment in round 2 of 5 (ETA 12 s in this round, 22 s a round at its pace)
    and one pending with 4 rounds to train, two at a time: (12 + 3 x 22 + 4 x 22) / 2 seconds left."""
    from types import SimpleNamespace

    from fedshard.sweep.reporting import Report

    path = tmp_path / "progress.json"
    path.write_text(json.dumps({**state(t0=report(), t1=report()), "round_started": time.time() - 10}))
    job = SimpleNamespace(
        index=1, run_id="abcdef0123456789", progress_file=path, cfg=SimpleNamespace(rounds=5), last_round=1
    )
    pending = SimpleNamespace(task=SimpleNamespace(rounds_to_train=4))
    sweep = SimpleNamespace(grid=None, configs=[1, 2, 3], running=[job], pending=[pending], parallel=2, failed=[])
    lines = []
    reporting = Report(sweep, echo=lines.append)
    assert reporting.eta() == pytest.approx((12 + 3 * 22 + 4 * 22) / 2, abs=1)
    reporting.look_at_steps([job])
    assert lines == []  # at most every STEPS_SECONDS
    reporting.stepped -= 60
    reporting.look_at_steps([job])
    assert len(lines) == 1 and lines[0].startswith("  [1/3] round 2/5: steps 8/20 (40%), 8 img/s, ETA 0:12")
    assert lines[0].endswith("(run abcdef01)")


def test_without_figures_the_sweeps_eta_takes_the_experiment_seconds_each_round_took():
    """--parallel 4, but one experiment ran: 20 s for its rounds 1 and 2, so 10 s a round (not 4 x as
    much, as if all four slots had been busy). 3 rounds are left of it and 4 of a pending one, and
    two experiments can run at once: (3 x 10 + 4 x 10) / 2 = 35 s."""
    from types import SimpleNamespace

    from fedshard.sweep.reporting import Report

    job = SimpleNamespace(progress_file=None, cfg=SimpleNamespace(rounds=5), last_round=2)
    pending = SimpleNamespace(task=SimpleNamespace(rounds_to_train=4))
    sweep = SimpleNamespace(grid=None, configs=[1, 2], running=[], pending=[pending], parallel=4, failed=[])
    reporting = Report(sweep, echo=lambda line: None)
    assert reporting.eta() is None  # no round trained yet: no pace to go by
    reporting.tallied = 100.0
    reporting.tally(105.0)  # nothing ran for 5 s: no experiment-seconds
    sweep.running = [job]
    reporting.tally(125.0)
    reporting.rounds_done = 2
    assert reporting.busy == pytest.approx(20.0)
    assert reporting.eta() == pytest.approx((3 * 10 + 4 * 10) / 2)
