"""planning.plan: what of a grid is left, and where each configuration starts (pure: run records
in, tasks out). Resume and extension must only ever save rounds, never change what is trained."""

from __future__ import annotations

import itertools

import pytest

from fedshard import tracking
from fedshard.core.config import ExperimentConfig
from fedshard.sweep.grid import SweepError, expand, make_grid
from fedshard.sweep.planning import Task, plan

_ids = itertools.count()


def record(cfg: ExperimentConfig, status="FINISHED", checkpoint=None, **tags) -> tracking.RunRecord:
    if checkpoint is not None:
        tags[tracking.CHECKPOINT_TAG] = str(checkpoint)
    return tracking.RunRecord(f"{status.lower()}{next(_ids)}", "1", status, 0, cfg.params(), tags)


def cfg(rounds=30, **changes) -> ExperimentConfig:
    return ExperimentConfig(world_size=2, learning_rate=1e-3, rounds=rounds, seed=1, **changes)


def test_default_grid_trains_each_setting_once_up_to_50_rounds():
    work = plan(expand(make_grid({})), [])
    assert len(work.tasks) == 54
    assert (work.rounds_to_train, work.rounds_from_scratch) == (1350, 2160)
    assert work.rounds_line() == "Rounds to train: 1350 (2160 without extending shorter runs)"
    for task in work.tasks:
        if task.cfg.rounds == 30:
            assert task == Task(task.cfg)
        else:  # waits for its 30-round twin of this plan and trains rounds 31..50 only
            assert task.after == task.cfg.replace(rounds=30) and task.start == 30 and task.rounds_to_train == 20
    assert plan(expand(make_grid({})), [], extend=False).rounds_to_train == 2160


def test_round_counts_chain_and_only_true_twins_extend():
    grid = make_grid({"world_sizes": "2", "learning_rates": "1e-3", "swap": "true", "rounds": "30,10,20", "seeds": "1"})
    tasks = {t.cfg.rounds: t for t in plan(expand(grid), []).tasks}
    assert tasks[10].after is None and tasks[20].after.rounds == 10 and tasks[30].after.rounds == 20
    assert sum(t.rounds_to_train for t in tasks.values()) == 30
    # Another batch size is another experiment: its rounds are not this one's.
    other = record(cfg(10, batch_size=16))
    assert plan([cfg(30)], [other]).tasks == [Task(cfg(30))]


def test_a_finished_shorter_run_in_the_store_is_extended():
    short, shorter = record(cfg(20)), record(cfg(10))
    (task,) = plan([cfg(50)], [shorter, short]).tasks
    assert (task.extends, task.start, task.rounds_to_train) == (short.run_id, 20, 30)
    assert plan([cfg(50)], [short], extend=False).tasks == [Task(cfg(50))]


def test_the_start_with_the_most_rounds_in_place_wins():
    failed_late = record(cfg(50), "FAILED", checkpoint=47)
    failed_early = record(cfg(50), "KILLED", checkpoint=12)
    twin = record(cfg(30))
    (task,) = plan([cfg(50)], [twin, failed_early, failed_late]).tasks
    assert (task.resume, task.start) == (failed_late.run_id, 47)  # 3 rounds left beat 20
    (task,) = plan([cfg(50)], [twin, failed_early]).tasks
    assert (task.extends, task.start) == (twin.run_id, 30)  # 20 rounds beat 38
    (task,) = plan([cfg(50)], [twin, failed_late], resume=False).tasks
    assert task.extends == twin.run_id
    work = plan([cfg(50)], [failed_late])
    assert work.rounds_line() == "Rounds to train: 3 (50 without resuming)"


def test_only_failed_killed_or_stale_runs_with_a_checkpoint_resume():
    running = record(cfg(), "RUNNING", checkpoint=5)
    no_checkpoint = record(cfg(), "FAILED")
    assert plan([cfg()], [running, no_checkpoint]).tasks == [Task(cfg())]
    (task,) = plan([cfg()], [running, no_checkpoint], stale={running.run_id}).tasks
    assert (task.resume, task.start) == (running.run_id, 5)
    assert plan([cfg()], [record(cfg())]).tasks == []  # FINISHED: nothing to do


@pytest.mark.parametrize("rounds", ["2,4", "4,2"])
def test_extension_plan_of_the_benchmark_grid(rounds):
    grid = make_grid({"world_sizes": "2", "learning_rates": "1e-3", "swap": "true", "rounds": rounds, "seeds": "1,2"})
    work = plan(expand(grid), [])
    assert (work.rounds_to_train, work.rounds_from_scratch) == (8, 12)
    longer = [t for t in work.tasks if t.cfg.rounds == 4]
    assert [t.after.seed for t in longer] == [t.cfg.seed for t in longer]  # each waits for its own twin


def test_runs_match_by_the_settings_of_a_result_not_where_their_data_sat():
    elsewhere = record(cfg(data_dir="/old/place", round_timeout=60))
    assert plan([cfg()], [elsewhere]).skipped == [(cfg(), elsewhere.run_id)]
    fedavg, other_batch = record(cfg(strategy="fedavg")), record(cfg(batch_size=16))
    assert plan([cfg()], [fedavg, other_batch]).tasks == [Task(cfg())]
    # extension and resume follow the same rule
    (task,) = plan([cfg(50)], [record(cfg(30, data_dir="/old/place"))]).tasks
    assert task.start == 30 and task.extends
    (task,) = plan([cfg(50)], [record(cfg(50, eval_batch_size=7), "FAILED", checkpoint=9)]).tasks
    assert (task.start, bool(task.resume)) == (9, True)
    assert plan([cfg(50)], [record(cfg(30, strategy="fedavg"))]).tasks == [Task(cfg(50))]


# --- chains: init_from=run:<name> (a pretrain run, then a grid from its final model) ----------------


def test_a_grid_that_starts_from_one_of_its_runs_runs_that_one_first(tmp_path):
    grid_file = tmp_path / "chain.yaml"
    grid_file.write_text(
        "pretrain: {world_size: 1, learning_rate: 1e-4, rounds: 10, seed: 77}\n"
        "world_sizes: [2]\nlearning_rates: [1e-3]\nswap: [false, true]\nrounds: [10]\nseeds: [1]\n"
        "params: {enable_layerwise_swapping: true}\n"
    )
    configs = expand(make_grid({}, ["max_train_samples=100"], grid_file))
    source, *grid = configs
    assert (source.world_size, source.rounds, source.seed, source.init_from) == (1, 10, 77, "")
    assert source.max_train_samples == 100  # the fixed settings are the pretrain run's too
    assert [c.init_from for c in grid] == ["run:ws1-lr0.0001-swapfalse-r10-s77-train100"] * 2
    assert all(c.enable_layerwise_swapping for c in grid)
    # Listed last in the grid, the source still goes first; what starts from it waits for it.
    work = plan([*grid, source], [])
    assert [t.cfg for t in work.tasks] == [source, *grid]
    assert [t.source for t in work.tasks] == [None, source, source]
    assert "once run ws1-lr0.0001-swapfalse-r10-s77-train100 of this sweep has FINISHED" in work.tasks[1].describe()
    # A FINISHED source: nothing waits; a resumed dependent never waits for it.
    done = plan(configs, [record(source), record(grid[0], "FAILED", checkpoint=3)])
    assert [(t.cfg, t.source, t.start) for t in done.tasks] == [(grid[0], None, 3), (grid[1], None, 0)]


def test_a_run_to_start_from_that_is_nowhere_is_refused_before_anything_runs():
    lost = cfg(init_from="run:ws1-lr0.0001-swapfalse-r10-s77")
    with pytest.raises(
        SweepError,
        match="no FINISHED run named 'ws1-lr0.0001-swapfalse-r10-s77' in the experiment, "
        "and no configuration of this grid has that name",
    ):
        plan([lost], [])
    finished_elsewhere = record(cfg(rounds=10), **{"mlflow.runName": "ws1-lr0.0001-swapfalse-r10-s77"})
    assert plan([lost], [finished_elsewhere]).tasks == [Task(lost)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("pretrain: [1]\n", "pretrain must be a mapping such as {world_size: 1"),
        ("pretrain: {wrold_size: 1}\n", "pretrain: unknown setting(s) wrold_size; valid: world_size"),
        ("pretrain: {world_size: 1}\nparams: {init_from: w.pt}\n", "pretrain sets init_from of every configuration"),
    ],
)
def test_a_bad_pretrain_is_refused(tmp_path, text, message):
    grid_file = tmp_path / "bad.yaml"
    grid_file.write_text(text)
    with pytest.raises(SweepError) as err:
        expand(make_grid({}, [], grid_file))
    assert message in str(err.value)
