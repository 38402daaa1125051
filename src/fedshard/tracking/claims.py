"""Claims: which process trains a configuration, decided in the tracking store that every sweep,
launcher and machine shares, so that two sweeps of one grid never train a configuration twice.

An experiment's run is its claim. From its creation it carries the configuration's identity,
digested (the tag fedshard.claim), its owner (host, pid and start time: owners.py), its state
(pending while being decided, held once won) and a heartbeat that its owner renews every few
seconds. A claim is live while its run is RUNNING, pending or held, its heartbeat is younger than
the claim's timeout and, on this host, its owner process still runs; a claim that is not is dead.

MLflow has no locks. Two things it does guarantee make claims safe instead:

- Create, then look. A claimant makes its run RUNNING and pending first and only then looks at all
  claims of the configuration: it wins when it sees no other live claim and no FINISHED run. Of two
  claimants whose runs were each in the store before their owner looked, one sees the other, so no
  two win. Seeing only pending others, the earliest (by start time, then run id) waits a moment for
  them to withdraw, the others withdraw and try again later; a held claim or a FINISHED run ends
  the attempt. The winner reaps the configuration's dead claims (below) before anything starts.
- Hands. A run changes hands (resumed, reaped, ended) only by logging the param
  fedshard.claim.<n>, n one more than its last. MLflow never changes a param's value, so of two
  processes that try the same n exactly one succeeds. An owner holds its run at hand h while no
  fedshard.claim.<h+1> exists: its launcher stops, writing nothing more into the run, when one
  appears (a sweep found its claim dead and took the run over), and ends the run itself only by
  taking h+1, so a run taken over is never ended, FINISHED least of all, by its former owner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field

from fedshard.core.config import ExperimentConfig
from fedshard.core.errors import FedshardError, described
from fedshard.tracking.owners import HOST_TAG, PID_TAG, host, owner_alive, owner_tags
from fedshard.tracking.runs import CLAIM_STATE_TAG as STATE_TAG
from fedshard.tracking.runs import WITHDRAWN, RunRecord, end_run, set_tags
from fedshard.tracking.store import client

log = logging.getLogger(__name__)

CLAIM_TAG = "fedshard.claim"  # the configuration's identity, digested: what every claim of it shares
HEARTBEAT_TAG = "fedshard.claim.heartbeat"  # seconds since the epoch, on the owner's clock
TIMEOUT_TAG = "fedshard.claim.timeout"  # the owner's: its heartbeat older than this, the claim is dead
PENDING, HELD, RELEASED = "pending", "held", "released"
HAND_PARAM = "fedshard.claim.{}"
_HAND = re.compile(r"fedshard\.claim\.(\d+)$")
_ENDS = ("finished", "failed", "killed")  # the hands an owner ends its run with (`end`)
# The setting: seconds without a heartbeat after which a claim is dead. A sweep's --claim-timeout sets it.
TIMEOUT_ENV = "FEDSHARD_CLAIM_TIMEOUT"
# The hand at which a launcher holds its run, as a sweep hands it to the launcher it starts ("0": a run
# the sweep created) and the launcher to its aggregator.
HAND_ENV = "FEDSHARD_CLAIM_HAND"
DEFAULT_TIMEOUT = 60.0
CONTENTION_WAIT = 5.0  # how long the earliest of several pending claimants waits for the others
LOOK_SECONDS = 0.25
# What a look decides (Verdict.kind).
WON, WAIT, CONTENDED, ELSEWHERE, FINISHED, LOST = "won", "wait", "contended", "elsewhere", "finished", "lost"


class ClaimError(FedshardError, ValueError):
    """A bad claim timeout setting; the message names the value and what is valid."""

    exit_code = 2


class ClaimLost(FedshardError):
    """The run changed hands: another process resumed, reaped or ended it."""

    exit_code = 3  # runtime.lifecycle.CLAIM_LOST: the launcher of a run that changed hands exits so


def timeout() -> float:
    """The claim timeout this process records on the claims it makes ($FEDSHARD_CLAIM_TIMEOUT)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ClaimError(
            f"{TIMEOUT_ENV}={text!r}: the claim timeout must be a number of seconds > 0 (default {DEFAULT_TIMEOUT:g})"
        )
    return value


def beat_seconds(timeout_s: float) -> float:
    """How often an owner renews its heartbeat: six times a timeout, at least every 10 s."""
    return min(10.0, timeout_s / 6)


def key(cfg: ExperimentConfig) -> str:
    """The configuration as the claim tag holds it: a digest of its identity, in the precision it
    computes in here (what its run records), so that `auto` and what it resolves to are one."""
    from fedshard.core.precision import resolved

    return hashlib.sha256(json.dumps(resolved(cfg).identity()).encode()).hexdigest()[:32]


def claim_tags(cfg: ExperimentConfig, state: str) -> dict[str, str]:
    """The tags that make a run a claim of `cfg` in `state`, with a fresh heartbeat."""
    return {CLAIM_TAG: key(cfg), STATE_TAG: state, **_beat()}


def _beat() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.3f}", TIMEOUT_TAG: f"{timeout():g}"}


def beat(run_id: str) -> None:
    client().set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")


# --------------------------------------------------------------------------- judging a claim


def is_claim(run: RunRecord) -> bool:
    return CLAIM_TAG in run.tags


def heartbeat_age(run: RunRecord, now: float | None = None) -> float | None:
    """Seconds since the claim's last heartbeat (None without one)."""
    try:
        return (time.time() if now is None else now) - float(run.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        return None


def claim_timeout(run: RunRecord) -> float:
    """The timeout its owner recorded (the owner's setting decides, whoever judges), else ours."""
    with suppress(KeyError, ValueError):
        value = float(run.tags[TIMEOUT_TAG])
        if value > 0 and math.isfinite(value):
            return value
    return timeout()


def live(run: RunRecord, now: float | None = None) -> bool:
    """Whether a claim's owner still holds it: RUNNING, pending or held, its heartbeat younger than its
    timeout, and on this host its owner process (pid and start time) still running. On other hosts
    the heartbeat alone counts (their clocks must agree with ours to well within the timeout)."""
    if run.status != "RUNNING" or run.tags.get(STATE_TAG) not in (PENDING, HELD):
        return False
    age = heartbeat_age(run, now)
    return age is not None and age <= claim_timeout(run) and owner_alive(run) is not False


def dead(run: RunRecord) -> bool:
    """A RUNNING run nobody will end: a claim that is not live, or (a run recorded before claims, a
    sweep's run) one whose owner on this host is gone."""
    if run.status != "RUNNING":
        return False
    return not live(run) if is_claim(run) else owner_alive(run) is False


def owner_text(run: RunRecord) -> str:
    """'pid 4711 on node-3' (and how old its heartbeat is, for a claim)."""
    where = f"pid {run.tags.get(PID_TAG, '?')} on {run.tags.get(HOST_TAG, 'an unknown host')}"
    age = heartbeat_age(run)
    return where + (f", heartbeat {age:.0f}s ago" if age is not None else "")


def claims_of(experiment_id: str, claim_key: str) -> list[RunRecord]:
    """Every run (not deleted) of the experiment that claims the configuration `claim_key`."""
    runs = client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{CLAIM_TAG}` = '{claim_key}'",
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    return [RunRecord.of(r) for r in runs]


@dataclass(frozen=True)
class Verdict:
    kind: str  # WON, WAIT, CONTENDED, ELSEWHERE (a held claim: `other`), FINISHED (`other`), LOST
    other: RunRecord | None = None
    dead: list[RunRecord] = field(default_factory=list)  # the configuration's dead claims, for the winner to reap


def judge(run_id: str, hand: int, claims: list[RunRecord], now: float | None = None) -> Verdict:
    """What claim `run_id` (held at `hand`) may do, given every claim of its configuration: pure."""
    mine = next((c for c in claims if c.run_id == run_id), None)
    if (
        mine is None
        or mine.status != "RUNNING"
        or mine.tags.get(STATE_TAG) not in (PENDING, HELD)
        or hands(mine) != hand
    ):
        return Verdict(LOST, mine)  # reaped or taken meanwhile (its owner was paused past the timeout)
    others = [c for c in claims if c.run_id != run_id]
    done = [c for c in others if c.status == "FINISHED"]
    if done:
        return Verdict(FINISHED, done[-1])
    alive = [c for c in others if live(c, now)]
    held = [c for c in alive if c.tags.get(STATE_TAG) == HELD]
    if held:
        return Verdict(ELSEWHERE, held[0])
    if alive:

        def order(c):
            return c.start_time, c.run_id

        first = min(alive, key=order)
        return Verdict(WAIT if order(mine) < order(first) else CONTENDED, first)
    return Verdict(WON, dead=[c for c in others if c.status == "RUNNING" and c.tags.get(STATE_TAG) in (PENDING, HELD)])


def acquire(run_id: str, hand: int, experiment_id: str, claim_key: str) -> Verdict:
    """Look at the configuration's claims once the pending claim `run_id` is in the store (create,
    then look), waiting while it is the earliest of several pending ones; the winner reaps the
    configuration's dead claims and is held from then on. Any other verdict: the caller withdraws."""
    deadline = time.monotonic() + CONTENTION_WAIT
    while True:
        verdict = judge(run_id, hand, claims_of(experiment_id, claim_key))
        if verdict.kind != WAIT:
            break
        if time.monotonic() > deadline:
            return Verdict(CONTENDED, verdict.other)
        time.sleep(LOOK_SECONDS)
        beat(run_id)
    if verdict.kind != WON:
        return verdict
    for other in verdict.dead:
        age = heartbeat_age(other)
        why = (
            f"stale: its owner ({owner_text(other)}) is gone or silent for over its claim timeout of "
            f"{claim_timeout(other):g}s" + (f" ({age:.0f}s)" if age is not None else "")
        )
        if not reap(other, "KILLED", why) and _finished(other.run_id):
            return Verdict(FINISHED, other)  # its owner came back and finished it just now
    client().set_tag(run_id, STATE_TAG, HELD)
    return verdict


# --------------------------------------------------------------------------- hands


def hands(run: RunRecord) -> int:
    """The run's last hand: how often it changed hands (0 for a run as created)."""
    return max((int(m.group(1)) for k in run.params if (m := _HAND.match(k))), default=0)


def take(run_id: str, n: int, what: str) -> bool:
    """Take hand `n` of the run, saying `what` for (resumed, reaped: why, finished, ...): True when this
    process got it, False when another process has it. Raises when the store cannot be used."""
    name = HAND_PARAM.format(n)
    value = f"{what}; pid {os.getpid()} on {host()} at {time.strftime('%Y-%m-%d %H:%M:%S')} ({secrets.token_hex(4)})"
    try:
        client().log_param(run_id, name, value[:5000])
    except Exception as exc:  # refused when another value is there; the store says below which
        log.debug(f"{name} of run {run_id} was not set here: {described(exc)}")
    return client().get_run(run_id).data.params.get(name) == value[:5000]


def taken(run_id: str, hand: int) -> str | None:
    """Who took the run from its owner of `hand` (the param's value), or None while it holds it."""
    return client().get_run(run_id).data.params.get(HAND_PARAM.format(hand + 1))


def lost(run_id: str, hand: int) -> str | None:
    """Who took the run from its owner of `hand` (resumed or reaped it: the param's value), or None
    while that owner holds it or has ended it itself (the hand after it says finished, failed, killed)."""
    who = taken(run_id, hand)
    return None if who is None or who.split(";")[0] in _ENDS else who


def check(run_id: str, hand: int) -> None:
    """Raise ClaimLost when the run is no longer held at `hand`."""
    if (who := taken(run_id, hand)) is not None:
        raise ClaimLost(f"run {run_id} changed hands: {who}")


def _finished(run_id: str) -> bool:
    """Whether the run is FINISHED, or its owner has taken the hand that finishes it."""
    run = RunRecord.of(client().get_run(run_id))
    return run.status == "FINISHED" or run.params.get(HAND_PARAM.format(hands(run)), "").startswith("finished")


def end(run_id: str, hand: int, status: str, reason: str | None = None, tags: dict[str, str] | None = None) -> bool:
    """End the run FINISHED, FAILED or KILLED as its owner of `hand`: only by taking the next hand, so
    False (and nothing written) when the run was taken over meanwhile."""
    if not take(run_id, hand + 1, status.lower()):
        return False
    end_run(run_id, status, reason, tags)
    return True


def reap(run: RunRecord, status: str, reason: str) -> bool:
    """End a run whose owner is gone (or paused past the timeout), fencing that owner off; False when
    another process took its next hand first (its owner finished it, or another sweep reaped it)."""
    if not take(run.run_id, hands(run) + 1, f"reaped: {reason}"):
        return False
    try:
        end_run(run.run_id, status, reason)
    except Exception as exc:
        if client().get_run(run.run_id).info.lifecycle_stage != "deleted":
            raise
        log.debug(f"run {run.run_id} was withdrawn by its owner meanwhile: gone all the same ({described(exc)})")
    return True


def reclaim(run: RunRecord, cfg: ExperimentConfig, what: str) -> int | None:
    """Take the next hand of an ended (or dead) run to continue it, and make it a pending claim owned
    by this process: the hand, or None when another process took it first."""
    hand = hands(run) + 1
    if not take(run.run_id, hand, what):
        return None
    set_tags(run.run_id, {**claim_tags(cfg, PENDING), **owner_tags()})
    client().update_run(run.run_id, status="RUNNING")
    return hand


def withdraw(run_id: str) -> None:
    """A claim that lost: no longer live at once (its state), then KILLED and deleted, so that no
    export, analysis or sweep sees it and the UI shows it only among deleted runs."""
    client().set_tag(run_id, STATE_TAG, WITHDRAWN)
    client().set_terminated(run_id, "KILLED")
    client().delete_run(run_id)


def release(run_id: str, status: str, reason: str) -> None:
    """A reclaimed run whose claim lost: back to an ended run (FAILED or KILLED) that may be resumed."""
    client().set_tag(run_id, STATE_TAG, RELEASED)
    end_run(run_id, status, reason)


# --------------------------------------------------------------------------- the owner's side


class Keeper:
    """The owner's side of a held claim, in the launcher: a thread renews the heartbeat every few
    seconds and notices when the run changed hands (`check` then raises ClaimLost); the launcher ends
    the run only through `end`, which takes the next hand."""

    def __init__(self, run_id: str, hand: int, every: float | None = None):
        self.run_id, self.hand = run_id, hand
        self.every = every or beat_seconds(timeout())
        self.taken: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedshard-claim", daemon=True)

    def start(self) -> Keeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.taken = taken(self.run_id, self.hand)
                if self.taken is not None:
                    return
                beat(self.run_id)
            except Exception as exc:  # a store hiccup: the next beat tries again
                log.debug(f"no heartbeat of run {self.run_id} this time: {described(exc)}")
            if self._stop.wait(self.every):
                return

    def check(self) -> None:
        if self.taken is not None:
            raise ClaimLost(f"run {self.run_id} changed hands: {self.taken}")

    def stop(self) -> None:
        self._stop.set()

    def end(self, status: str, reason: str | None = None, tags: dict[str, str] | None = None) -> bool:
        self.stop()
        return end(self.run_id, self.hand, status, reason, tags)
