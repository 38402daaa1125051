"""Progress inside a round: trainers report, the aggregator relays, the launcher and the sweep show it.

A CPU round over the full data set is many minutes; nothing in MLflow moves until it ends
(and nothing is logged to MLflow per step). So each trainer puts the steps it has done into
the experiment's rendezvous store every second or so (`TrainerReporter`); the aggregator reads
them in a thread and writes one small JSON file beside the launcher (`Relay`); the launcher
(a bar on a terminal, else a line every --progress-every seconds) and the sweep read that file
(`read`, `figures`). The launcher never imports PyTorch for it, and a trainer that stops
reporting shows as silent there long before round_timeout ends the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Never, TextIO

from fedshard.core.errors import described
from fedshard.core.files import write_atomic

if TYPE_CHECKING:
    from torch.distributed import Store
    from tqdm import tqdm

log = logging.getLogger(__name__)

REPORT_SECONDS = 1.0  # how often a trainer reports (and the aggregator relays) at most
SILENT_SECONDS = 30.0  # a trainer not heard from for this long is called silent (or a third of
# round_timeout, if that is shorter: it must show before the timeout ends the run)


def key(trainer: int) -> str:
    return f"progress/{trainer}"


class TrainerReporter:
    """A trainer's reports: as train_local's on_step, the round, its steps done of all, images and
    seconds; from a thread of its own, the same report again every second with a beat count, also
    between rounds and while weights travel. So a trainer that waits is heard, and only one that is
    stopped, hung in a system call, dead or cut off falls silent. Only that thread talks to the
    store: a training step never waits for it, and a store error (a hiccup, or the experiment
    ending) fails no round and silences no trainer: the next beat tries again."""

    def __init__(self, store: Store, trainer: int, batch_size: int):
        self.store, self.key, self.batch = store, key(trainer), batch_size
        self.lock = threading.Lock()
        self.report = {"round": 0, "done": 0, "total": 0, "images": 0, "seconds": 0.0, "beat": 0}
        self.round_images, self.round_start = 0, time.monotonic()
        self.stop, self.now = threading.Event(), threading.Event()
        threading.Thread(target=self._beat, name="progress", daemon=True).start()

    def round_started(self, round_: int, images: int) -> None:
        """A new round of `images` training images (all its local epochs)."""
        with self.lock:
            self.report.update(round=round_, done=0, total=0, images=0, seconds=0.0)
            self.round_images, self.round_start = images, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            self.report.update(
                done=done,
                total=total,
                images=min(done * self.batch, self.round_images),
                seconds=time.monotonic() - self.round_start,
            )
        if done in (1, total):  # the first and the last step at once; the beat carries the others
            self.now.set()

    def _beat(self) -> None:
        while True:
            self.now.wait(REPORT_SECONDS)
            if self.stop.is_set():
                return
            self.now.clear()
            with self.lock:
                self.report["beat"] += 1
                raw = json.dumps(self.report)
            try:
                self.store.set(self.key, raw)
            except Exception as exc:  # a beat is never worth failing a round for; the next one tries again
                log.debug(f"a progress beat was not sent: {described(exc)}")

    def close(self) -> None:
        self.stop.set()
        self.now.set()


class Relay:
    """The aggregator's side: every second, the trainers' latest reports and when each was last
    heard (by the aggregator's clock, so other machines' clocks do not matter), into `path`."""

    def __init__(self, store: Store, path: str | Path, world_size: int, rounds: int, round_timeout: float = 1800.0):
        self.store, self.path, self.n, self.rounds = store, Path(path), world_size, rounds
        self.state: dict[str, Any] = {  # the JSON the relay writes: read() gives it back
            "round": 0,
            "rounds": rounds,
            "world_size": world_size,
            "round_started": time.time(),
            "silent_after": min(SILENT_SECONDS, round_timeout / 3),
            "trainers": {},
        }
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self.writing, self.closed = threading.Lock(), False

    def start(self) -> Relay:
        self.thread.start()
        return self

    def round_started(self, round_: int) -> None:
        self.state.update(round=round_, round_started=time.time())

    def _run(self) -> None:
        seen: dict[int, str] = {}
        while not self.stop.wait(REPORT_SECONDS):
            try:
                for k in range(self.n):
                    if self.store.check([key(k)]) and (raw := self.store.get(key(k)).decode()) != seen.get(k):
                        seen[k] = raw
                        self.state["trainers"][str(k)] = {**json.loads(raw), "heard": time.time()}
                self._write()
            except Exception as exc:  # progress is never worth failing a round for; the next second tries again
                log.debug(f"the trainers' progress was not relayed this second: {described(exc)}")
                continue

    def _write(self, closed: bool = False) -> None:
        """Write the state, unless the relay is closed: the closed state is the file's last, even
        when the thread was still waiting for the store then."""
        with self.writing:
            if self.closed:
                return
            self.closed = closed
            write_atomic(self.path, json.dumps({**self.state, "closed": closed, "written": time.time()}).encode())

    def close(self) -> None:
        """Stop, and say so in the file: the rounds are over, nobody is silent any more."""
        self.stop.set()
        with contextlib.suppress(OSError):
            self._write(closed=True)


def read(path: str | Path) -> dict | None:
    """The relayed state, or None before the first write (or where there is none)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Figures:
    round: int
    rounds: int
    done: int  # steps of all trainers in this round
    total: int
    images_per_s: float
    eta_round: float | None  # seconds
    eta_run: float | None
    pace: float | None  # seconds a round takes at this round's pace
    silent: tuple  # (trainer, seconds since it was last heard, or since the round began)

    @property
    def news(self) -> bool:
        """Worth a line: steps of the round under way once every trainer has taken one of them (before
        that the count of all steps is not known: a trainer still waiting for its weights has said
        nothing of this round; a finished round's figures are its result's line), or a silent trainer."""
        return bool(self.silent) or (self.eta_round is not None and 0 < self.done < self.total)

    def line(self) -> str:
        """'round 2/5: steps 12/32 (38%), 41 img/s, ETA 0:48 (run 3:12)'."""
        if not self.total:
            text = f"round {self.round}/{self.rounds}: no steps reported yet"
        else:
            text = (
                f"round {self.round}/{self.rounds}: steps {self.done}/{self.total} "
                f"({100 * self.done / self.total:.0f}%), {self.images_per_s:.0f} img/s, ETA {clock(self.eta_round)}"
            )
            text += f" (run {clock(self.eta_run)})" if self.eta_run is not None else ""
        return text + "".join(f"; trainer {k} silent for {s:.0f}s" for k, s in self.silent)


def figures(state: dict | None, now: float | None = None) -> Figures | None:
    """What a relayed state means: steps done of all in the current round, images per second,
    the round's ETA (its slowest trainer's) and the run's (the rounds left at this round's pace),
    and which trainers have not been heard from for a while (silent_after) since the round began.
    None before the first round, and after the last (the relay closed)."""
    if not state or not state.get("round") or state.get("closed"):
        return None
    now = time.time() if now is None else now
    r, started = state["round"], state["round_started"]
    current = {int(k): t for k, t in state["trainers"].items() if t["round"] == r}
    done, total = sum(t["done"] for t in current.values()), sum(t["total"] for t in current.values())
    ips = sum(t["images"] / t["seconds"] for t in current.values() if t["seconds"] > 0)
    eta_round = eta_run = pace = None
    if len(current) == state["world_size"] and all(t["done"] and t["seconds"] > 0 for t in current.values()):
        eta_round = max((t["total"] - t["done"]) * t["seconds"] / t["done"] for t in current.values())
        pace = now - started + eta_round
        eta_run = eta_round + (state["rounds"] - r) * pace
    silent = []
    for k in range(state["world_size"]):
        t = state["trainers"].get(str(k))
        quiet = now - max(t["heard"] if t is not None else 0.0, started)
        if quiet >= state.get("silent_after", SILENT_SECONDS):
            silent.append((k, quiet))
    return Figures(r, state["rounds"], done, total, ips, eta_round, eta_run, pace, tuple(silent))


def clock(seconds: float | None) -> str:
    """m:ss, or h:mm:ss from an hour on; '?' when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


class Display:
    """The launcher's view of the round in progress: a live bar on a terminal (with the round, the
    steps of all trainers, images/s and the ETAs of the round and the run), else a line every
    `every` seconds; nothing when `every` is 0. Other output goes through `write`, above the bar."""

    def __init__(
        self, path: str | Path, every: float, echo: Callable[[str], None] = print, stream: TextIO | None = None
    ):
        import sys

        self.path, self.every, self.echo = Path(path), every, echo
        self.stream = stream or sys.stderr
        self.live = every > 0 and self.stream.isatty()
        self.bar: tqdm[Never] | None = None
        self.looked, self.said = 0.0, time.monotonic()

    def write(self, line: str) -> None:
        """`echo` the line, to its own stream (the round lines of `fedshard run > log` reach the log),
        the bar cleared while it is written and drawn again below it."""
        if self.bar is None:
            self.echo(line)
            return
        with self.bar.external_write_mode(file=self.stream):
            self.echo(line)

    def tick(self) -> None:
        now = time.monotonic()
        if self.every <= 0 or now - self.looked < REPORT_SECONDS:
            return
        self.looked = now
        f = figures(read(self.path))
        if f is None:
            return
        if self.live:
            self._draw(f)
        elif now - self.said >= self.every and f.news:
            self.said = now
            self.echo(f.line())

    def _draw(self, f: Figures) -> None:
        from tqdm import tqdm

        desc = f"round {f.round}/{f.rounds}"
        bar = self.bar
        if bar is None:
            tqdm.monitor_interval = 0  # no monitor thread: the launcher forks its children
            bar = self.bar = tqdm(
                total=f.total,
                desc=desc,
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} steps{postfix}",
            )
        if bar.desc != desc or bar.total != f.total:
            bar.reset(total=f.total)
            bar.set_description_str(desc, refresh=False)
        bar.n = f.done
        bar.set_postfix_str(
            f"{f.images_per_s:.0f} img/s, ETA {clock(f.eta_round)}, run {clock(f.eta_run)}"
            + "".join(f", trainer {k} silent {s:.0f}s" for k, s in f.silent)
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
