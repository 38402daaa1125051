"""Claims (tracking/claims.py): when a claim is live, what a claimant may do given the claims it sees
(pure), and hands: of two processes that take one hand of a run, exactly one gets it (a real store).
The races between whole sweeps are in tests/test_sweep.py and tests/test_several_machines.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedshard import tracking
from fedshard.core.config import ExperimentConfig
from fedshard.tracking import claims
from fedshard.tracking.runs import RunRecord

NOW = 1_000_000.0


def claim(
    run_id: str,
    status: str = "RUNNING",
    state: str = claims.HELD,
    age: float = 1.0,
    host: str = "elsewhere",
    pid: int = 1,
    start: int = 0,
    timeout: float = 60.0,
    params=None,
) -> RunRecord:
    tags = {
        claims.CLAIM_TAG: "k",
        claims.STATE_TAG: state,
        claims.HEARTBEAT_TAG: str(NOW - age),
        claims.TIMEOUT_TAG: str(timeout),
        tracking.HOST_TAG: host,
        tracking.PID_TAG: str(pid),
    }
    return RunRecord(run_id, "1", status, start, dict(params or {}), tags)


def test_a_claim_is_live_while_its_heartbeat_is_fresh_and_on_this_host_while_its_owner_runs():
    assert claims.live(claim("a", age=59), NOW)
    assert not claims.live(claim("a", age=61), NOW)  # its own timeout decides
    assert not claims.live(claim("a", age=3, timeout=2), NOW)
    assert not claims.live(claim("a", status="FAILED"), NOW) and not claims.live(claim("a", state="withdrawn"), NOW)
    gone = subprocess.Popen(["true"])
    gone.wait()
    here = {"host": tracking.host()}
    assert not claims.live(claim("a", pid=gone.pid, **here), NOW)  # a fresh heartbeat, but its process is gone
    mine = claim("a", pid=os.getpid(), **here)
    mine.tags[tracking.owners.PID_STARTED_TAG] = f"{tracking.owners.started_at():.2f}"
    assert claims.live(mine, NOW)
    assert not claims.live(claim("a", pid=os.getpid(), age=120, **here), NOW)  # alive but silent: paused, taken over


def test_what_a_claimant_may_do_given_the_claims_it_sees():
    mine = claim("m", state=claims.PENDING, start=5)
    judge = claims.judge
    assert judge("m", 0, [mine], NOW).kind == claims.WON
    assert judge("m", 0, [mine, claim("f", status="FINISHED")], NOW).kind == claims.FINISHED
    held = judge("m", 0, [mine, claim("h"), claim("p", state=claims.PENDING)], NOW)
    assert (held.kind, held.other.run_id) == (claims.ELSEWHERE, "h")
    # Pending claims only: the earliest (start time, then run id) waits for the later ones to withdraw.
    assert judge("m", 0, [mine, claim("p", state=claims.PENDING, start=4)], NOW).kind == claims.CONTENDED
    assert judge("m", 0, [mine, claim("p", state=claims.PENDING, start=6)], NOW).kind == claims.WAIT
    assert judge("m", 0, [mine, claim("l", state=claims.PENDING, start=5)], NOW).kind == claims.CONTENDED
    # Dead claims do not count; the winner reaps them. Withdrawn ones are nobody's to reap.
    won = judge("m", 0, [mine, claim("d", age=300), claim("w", state="withdrawn"), claim("k", status="KILLED")], NOW)
    assert (won.kind, [r.run_id for r in won.dead]) == (claims.WON, ["d"])
    # Its own claim reaped meanwhile (its owner was paused past the timeout), or taken at another hand.
    assert judge("m", 0, [claim("m", status="KILLED")], NOW).kind == claims.LOST
    assert judge("m", 0, [claim("m", params={"fedshard.claim.1": "reaped"})], NOW).kind == claims.LOST
    assert judge("m", 1, [claim("m", params={"fedshard.claim.1": "resumed"})], NOW).kind == claims.WON


@pytest.mark.slow
def test_of_two_processes_taking_one_hand_exactly_one_gets_it_and_an_owner_ends_only_its_own_run(store):
    run_id = tracking.start_run(ExperimentConfig(world_size=1, precision="fp32"), "hands")
    takers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from fedshard.tracking import claims; "
                f"sys.exit(0 if claims.take('{run_id}', 1, 'resumed') else 3)",
            ],
            env=dict(os.environ),
        )
        for _ in range(2)
    ]
    assert sorted(t.wait(timeout=120) for t in takers) == [0, 3]
    assert claims.taken(run_id, 0).startswith("resumed; pid ")
    assert claims.lost(run_id, 0) is not None and claims.lost(run_id, 1) is None
    assert not claims.end(run_id, 0, "FINISHED")  # its former owner: nothing written
    assert tracking.run_status(run_id) == "RUNNING"
    assert claims.end(run_id, 1, "FINISHED") and tracking.run_status(run_id) == "FINISHED"
    assert claims.lost(run_id, 1) is None  # ended by its owner, not taken


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_claim_timeout_is_refused_naming_it(monkeypatch, value):
    monkeypatch.setenv(claims.TIMEOUT_ENV, value)
    with pytest.raises(claims.ClaimError, match=f"FEDSHARD_CLAIM_TIMEOUT='{value}': the claim timeout must be"):
        claims.timeout()
    monkeypatch.setenv(claims.TIMEOUT_ENV, "4")
    assert claims.timeout() == 4 and claims.beat_seconds(4) == pytest.approx(4 / 6)
    assert claims.beat_seconds(claims.DEFAULT_TIMEOUT) == 10
