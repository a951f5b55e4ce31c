"""The scheduling policy, its measurements and the simulation that drives it (no Ray)."""

import pytest

from orchestrator.schedule import (EVALUATE, TRAIN, Job, Scheduler, SimTrial, TaskRecord, costs, figures, fits, fitting,
                                   simulate)

GPU = {"GPU": 1.0}


def train(name: str, seconds: float, need=GPU) -> Job:
    return Job.make(f"train {name}", TRAIN, name, need, seconds)


def evaluate(trial: str, model: str, seconds: float = 1.0) -> Job:
    return Job.make(f"evaluate {trial} {model}", EVALUATE, model, GPU, seconds, trial=trial)


def test_fits_and_fitting():
    assert fits({"GPU": 1}, {"GPU": 1.0, "CPU": 0}) and not fits({"GPU": 1, "CPU": 1}, {"GPU": 1})
    assert fitting({"CPU": 1}, {"CPU": 4}) == 4 and fitting({"GPU": 0.25}, {"GPU": 2}) == 8
    assert fitting({"CPU": 2, "GPU": 1}, {"CPU": 8, "GPU": 2}) == 2 and fitting({"GPU": 1}, {"CPU": 8}) == 0


def test_trainings_longest_first_into_free_capacity_only():
    scheduler = Scheduler({"GPU": 2})
    for name, seconds in [("a", 10), ("b", 30), ("c", 20)]:
        scheduler.add(train(name, seconds))
    assert [j.model for j in scheduler.start()] == ["b", "c"]  # two slots, the two longest
    assert scheduler.start() == []  # nothing free
    scheduler.finish("train c")
    assert [j.model for j in scheduler.start()] == ["a"]


def test_evaluations_wait_for_their_model_then_go_before_trainings():
    scheduler = Scheduler({"GPU": 1})
    scheduler.add(train("m", 10))
    scheduler.add(train("n", 50))
    scheduler.add(evaluate("t1", "m"))
    assert [j.id for j in scheduler.start()] == ["train n"]  # the evaluation's model does not exist
    assert scheduler.waiting_for_models() == {"m"}
    scheduler.model_ready("m")  # trained elsewhere, say
    scheduler.finish("train n")
    assert [j.id for j in scheduler.start()] == ["evaluate t1 m"]  # ready evaluations first


def test_first_fit_lets_a_smaller_job_pass_one_that_does_not_fit():
    scheduler = Scheduler({"GPU": 2})
    scheduler.add(train("ddp", 100, {"GPU": 2}))
    scheduler.add(train("small", 10))
    scheduler.running["other"] = train("other", 5)  # one GPU already held
    scheduler.held = {"GPU": 1.0}
    assert [j.model for j in scheduler.start()] == ["small"]


def test_capacity_changes_are_taken_into_account():
    scheduler = Scheduler({"GPU": 0})
    scheduler.add(train("a", 1))
    assert scheduler.start() == []
    scheduler.set_capacity({"GPU": 1})  # a node joined
    assert [j.model for j in scheduler.start()] == ["a"]


def record(job: str, kind: str, ready: float, granted: float, end: float, model: str = "m", trial=None, slots: float = 1.0,
           start=None) -> TaskRecord:
    return TaskRecord(job, kind, model, trial, {"GPU": slots}, ready, granted, granted if start is None else start, end)


def test_figures_of_a_hand_made_schedule():
    # two slots; a training 0-10 on slot 1, its evaluation waits 2 s for a slot (ready at 10, granted at 12), a second
    # training 0-12 on slot 2
    records = [record("t1", TRAIN, 0, 0, 10, start=1), record("t2", TRAIN, 0, 0, 12, model="n"),
               record("e1", EVALUATE, 10, 12, 14, trial="x")]
    f = figures(records, "GPU", 2)
    assert f.makespan == 14
    assert f.work_bound == pytest.approx((10 + 12 + 2) / 2) and f.chain_bound == 12
    assert f.lower_bound == 12 and f.ratio == pytest.approx(14 / 12)
    # slot 1 was free from 10 to 12 while e1 was ready: 2 slot-seconds of 2 x 14
    assert f.free_while_ready == pytest.approx(2 / 28)
    assert f.startup_s == pytest.approx(0.5) and (f.trainings, f.evaluations) == (2, 1)


def test_simulation_packs_a_pipeline_to_its_bound():
    """12 trainings of mixed length on 4 slots, then 3 trials evaluating every model:
    the policy keeps every slot busy, so the makespan is the work bound (ties aside)."""
    lengths = [90, 80, 70, 60, 50, 40, 40, 30, 30, 20, 20, 10]
    trainings = [train(f"m{i}", s) for i, s in enumerate(lengths)]
    trials = [SimTrial(f"t{k}", tuple(evaluate(f"t{k}", f"m{i}", 5) for i in range(len(lengths)))) for k in range(3)]
    sim = simulate(trainings, trials, {"GPU": 4}, max_concurrent=3)
    f = figures(sim.records, "GPU", 4)
    assert (f.trainings, f.evaluations) == (12, 36)
    assert f.free_while_ready == pytest.approx(0.0)
    assert f.ratio <= 1.05, f
    # an evaluation never starts before its model exists
    ends = {r.model: r.end for r in sim.records if r.kind == TRAIN}
    assert all(r.granted >= ends[r.model] for r in sim.records if r.kind == EVALUATE)


def test_simulation_admits_trials_as_tune_does():
    trainings = [train("m", 10)]
    trials = [SimTrial(f"t{k}", (evaluate(f"t{k}", "m", 1),)) for k in range(4)]
    sim = simulate(trainings, trials, {"GPU": 1}, max_concurrent=2)
    assert [sim.trials_started[f"t{k}"] for k in range(4)] == [0, 0, 11, 12]


def test_costs_split_a_pipeline_training_among_the_trials_that_used_it():
    records = [record("t", TRAIN, 0, 0, 3600), record("e1", EVALUATE, 0, 3600, 5400, trial="a"),
               record("e2", EVALUATE, 0, 3600, 3600 + 900, trial="b"), record("x", TRAIN, 0, 0, 1800, model="own", trial="b")]
    c = costs(records, "GPU")
    assert c.training_hours == pytest.approx(1.5) and c.evaluation_hours == pytest.approx(0.75)
    assert c.per_trial == pytest.approx({"a": 0.5 + 0.5, "b": 0.25 + 0.5 + 0.5})
    assert c.share("a") + c.share("b") == pytest.approx(1.0)
