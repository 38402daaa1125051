"""progress.py's reporting side, through a real rendezvous store: a store error fails no training
step and silences no trainer, the relay's closed state is its file's last, and the launcher's
lines keep their own stream while the bar is drawn."""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from fedshard.runtime import progress


def tcp_store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


class FlakyStore:
    """A real store whose first `set` fails, as one whose connection hiccups."""

    def __init__(self, store):
        self.store, self.failed = store, 0

    def set(self, key, value):
        if not self.failed:
            self.failed += 1
            raise RuntimeError("Connection reset by peer")
        self.store.set(key, value)


def published(store, key, ready, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = json.loads(store.get(key)) if store.check([key]) else None
        if got is not None and ready(got):
            return got
        assert time.monotonic() < deadline, f"not published: {got}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_store_error_fails_no_step_and_the_trainer_goes_on_being_heard():
    server = tcp_store()
    flaky = FlakyStore(server)
    reporter = progress.TrainerReporter(flaky, 0, batch_size=8)
    try:
        reporter.round_started(1, images=24)
        for done in (1, 2, 3):
            reporter(done, 3)  # the first step's report fails to be stored: the step does not
        got = published(server, progress.key(0), lambda r: r["done"] == 3)
        later = published(server, progress.key(0), lambda r: r["beat"] >= got["beat"] + 1)
    finally:
        reporter.close()
    assert flaky.failed == 1 and (got["round"], got["total"], got["images"]) == (1, 3, 24)
    assert later["beat"] > got["beat"]  # and it goes on beating


class StuckStore:
    """A real store whose first `get` blocks until released, as one waiting on a slow network."""

    def __init__(self, store):
        self.store, self.entered, self.release = store, threading.Event(), threading.Event()

    def check(self, keys):
        return self.store.check(keys)

    def get(self, key):
        self.entered.set()
        self.release.wait(10)
        return self.store.get(key)


def test_the_relays_closed_state_is_its_files_last_even_when_its_thread_was_waiting(tmp_path):
    server = tcp_store()
    server.set(progress.key(0), json.dumps({"round": 1, "done": 1, "total": 3, "images": 8, "seconds": 1.0}))
    stuck, path = StuckStore(server), tmp_path / "progress.json"
    relay = progress.Relay(stuck, path, world_size=1, rounds=3).start()
    assert stuck.entered.wait(10)
    relay.close()
    assert progress.read(path)["closed"]
    stuck.release.set()  # the thread gets its answer after the close, and must not write it
    relay.thread.join(10)
    assert not relay.thread.is_alive() and progress.read(path)["closed"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_with_a_bar_the_lines_still_go_to_their_own_stream(tmp_path):
    """`fedshard run > log` on a terminal: the bar is on stderr, the round lines in the log."""
    path = tmp_path / "progress.json"
    trainer = {"round": 2, "done": 4, "total": 10, "images": 32, "seconds": 8.0, "heard": time.time()}
    path.write_text(
        json.dumps(
            {
                "round": 2,
                "rounds": 5,
                "world_size": 1,
                "round_started": time.time() - 10,
                "silent_after": 30.0,
                "trainers": {"0": trainer},
            }
        )
    )
    stderr, lines = Terminal(), []
    display = progress.Display(path, every=1.0, echo=lines.append, stream=stderr)
    display.tick()
    assert display.live and display.bar is not None and "round 2/5" in stderr.getvalue()
    display.write("round 1/5: test_loss=4.1 test_accuracy=0.05")
    display.close()
    assert lines == ["round 1/5: test_loss=4.1 test_accuracy=0.05"]
    assert "test_loss" not in stderr.getvalue()
