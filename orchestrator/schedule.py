"""How a sweep's work is put onto the cluster: the policy, its measurements, and a
discrete-event simulation that drives the same policy — pure Python, no Ray.

A sweep has two kinds of jobs. A *training* produces a model (its key); an *evaluation*
needs one model and scores one category. Ray places and runs every job; this module
decides which job is handed to Ray when, so that no slot stands free while work whose
inputs exist waits:

1. Jobs start only into free capacity: the cluster's resources minus what started jobs
   hold (``Scheduler.capacity`` is refreshed from the cluster as nodes come and go).
2. Evaluations whose model exists go first, oldest request first: each is short and
   lets its trial finish (and, for Optuna, the searcher learn from it).
3. Then trainings, longest expected first (LPT): the long ones start early and the
   short ones fill the end, so the last wave is not one long training on idle slots.
4. First fit in that order: a job that does not fit the free capacity does not block a
   smaller one behind it.

The same :class:`Scheduler` runs in the sweep (``orchestrator/ray_backend.py``, in one
actor per sweep) and in :func:`simulate`, which replays a sweep's jobs with durations from
a timing model; :func:`figures` measures a schedule from its :class:`TaskRecord` list,
whether the records came from a real run or a simulated one.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

Resources = dict[str, float]  # Ray resource name ("CPU", "GPU", a custom one) -> amount

TRAIN, EVALUATE = "train", "evaluate"


@dataclass(frozen=True)
class Job:
    """One unit of work handed to Ray: a training (produces ``model``) or an evaluation
    (needs ``model``)."""

    id: str
    kind: str  # TRAIN | EVALUATE
    model: str  # the model key it produces (training) or needs (evaluation)
    resources: tuple[tuple[str, float], ...]  # what it holds while it runs, all workers together
    expected_s: float  # the timing model's estimate: orders trainings (LPT)
    trial: str | None = None  # the trial that asked for it (None: the sweep's pipeline)

    @staticmethod
    def make(id: str, kind: str, model: str, resources: Resources, expected_s: float, trial: str | None = None) -> "Job":
        assert kind in (TRAIN, EVALUATE), kind
        return Job(id, kind, model, tuple(sorted((k, float(v)) for k, v in resources.items() if v)), float(expected_s), trial)

    @property
    def needs(self) -> Resources:
        return dict(self.resources)


def fits(need: Resources, free: Resources) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def fitting(need: Resources, capacity: Resources) -> int:
    """How many jobs of ``need`` the ``capacity`` holds at once (0 if none; a job that
    needs nothing fits without bound, reported as a large number)."""
    counts = [math.floor(capacity.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(counts) if counts else 10**9


class Scheduler:
    """The policy of the module docstring, as a queue with one decision: :meth:`start`."""

    def __init__(self, capacity: Resources):
        self.capacity: Resources = dict(capacity)
        self.held: Resources = {}
        self.waiting: dict[str, tuple[int, Job]] = {}  # job id -> (arrival order, job)
        self.running: dict[str, Job] = {}
        self.models: set[str] = set()  # models that exist
        self._arrivals = itertools.count()

    # ---- what the scheduler is told
    def set_capacity(self, capacity: Resources) -> None:
        """The cluster changed (a node joined or left): jobs already running keep theirs."""
        self.capacity = dict(capacity)

    def add(self, job: Job) -> None:
        if job.id not in self.waiting and job.id not in self.running:
            self.waiting[job.id] = (next(self._arrivals), job)

    def model_ready(self, key: str) -> None:
        self.models.add(key)

    def finish(self, job_id: str) -> Job | None:
        """A started job ended (either way): its resources are free again."""
        job = self.running.pop(job_id, None)
        if job is not None:
            for k, v in job.resources:
                self.held[k] = self.held.get(k, 0.0) - v
        return job

    def cancel(self, job_id: str) -> None:
        self.waiting.pop(job_id, None)

    # ---- what it decides
    def free(self) -> Resources:
        return {k: v - self.held.get(k, 0.0) for k, v in self.capacity.items()}

    def ready(self, job: Job) -> bool:
        return job.kind == TRAIN or job.model in self.models

    def waiting_for_models(self) -> set[str]:
        """Models that queued evaluations wait for (a sweep polls the store for them)."""
        return {job.model for _, job in self.waiting.values() if job.kind == EVALUATE and job.model not in self.models}

    def priority(self) -> list[Job]:
        """Ready jobs in the order they are offered free capacity (rules 2 and 3)."""
        ready = [(order, job) for order, job in self.waiting.values() if self.ready(job)]
        evaluations = sorted((o, j) for o, j in ready if j.kind == EVALUATE)
        trainings = sorted(((-j.expected_s, o), j) for o, j in ready if j.kind == TRAIN)
        return [j for _, j in evaluations] + [j for _, j in trainings]

    def start(self) -> list[Job]:
        """The jobs to start now (rule 4: first fit); they count as running from here."""
        started = []
        free = self.free()
        for job in self.priority():
            if fits(job.needs, free):
                for k, v in job.resources:
                    free[k] = free.get(k, 0.0) - v
                    self.held[k] = self.held.get(k, 0.0) + v
                del self.waiting[job.id]
                self.running[job.id] = job
                started.append(job)
        return started


# ------------------------------------------------------------------------------ records


@dataclass
class TaskRecord:
    """When one job was ready, handed to Ray, running and done (``time.time()`` seconds),
    and where: what a sweep logs and :func:`figures` reads."""

    job: str
    kind: str
    model: str
    trial: str | None
    resources: Resources
    ready: float  # its inputs existed (a training: it was queued; an evaluation: its model existed and its trial asked)
    granted: float  # the scheduler started it: from here it holds its resources
    start: float  # its own code began (after process / Train start-up)
    end: float
    slot: str = ""  # the node it ran on

    def held_seconds(self) -> float:
        return max(0.0, self.end - self.granted)


@dataclass(frozen=True)
class Figures:
    """A schedule measured against its lower bound (all times in seconds)."""

    slots: float
    makespan: float
    lower_bound: float  # max(total held slot-seconds / slots, the longest training + evaluation chain)
    work_bound: float  # total held slot-seconds / slots
    chain_bound: float  # the longest training + its longest evaluation
    free_while_ready: float  # share of slot-time a slot stood free while a ready job waited
    startup_s: float  # mean seconds from a training's grant to its first line of training code
    trainings: int
    evaluations: int

    @property
    def ratio(self) -> float:
        return self.makespan / self.lower_bound if self.lower_bound else float("nan")


def figures(records: Sequence[TaskRecord], slot_resource: str, slots: float, origin: float | None = None) -> Figures:
    """makespan / LB, free-while-ready and start-up of a schedule. A job occupies
    ``resources[slot_resource]`` slots from its grant to its end; ``origin`` (default: the
    first job's ready time) is when the sweep's work began."""
    if not records:
        return Figures(slots, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    t0 = min(r.ready for r in records) if origin is None else origin
    makespan = max(r.end for r in records) - t0
    units = {r.job: r.resources.get(slot_resource, 0.0) for r in records}
    work = sum(r.held_seconds() * units[r.job] for r in records)
    evaluations: dict[str, float] = {}
    for r in records:
        if r.kind == EVALUATE:
            evaluations[r.model] = max(evaluations.get(r.model, 0.0), r.held_seconds())
    chain = max([r.held_seconds() + evaluations.get(r.model, 0.0) for r in records if r.kind == TRAIN]
                + [v for v in evaluations.values()] + [0.0])
    # Sweep the timeline: between consecutive events, free slots F and waiting ready demand R
    # are constant; free-while-ready slot-time is the integral of min(F, R).
    events = sorted({t for r in records for t in (r.ready, r.granted, r.end)})
    idle_ready = 0.0
    for a, b in zip(events, events[1:]):
        mid = (a + b) / 2
        busy = sum(units[r.job] for r in records if r.granted <= mid < r.end)
        demand = sum(units[r.job] for r in records if r.ready <= mid < r.granted)
        idle_ready += min(max(0.0, slots - busy), demand) * (b - a)
    startups = [r.start - r.granted for r in records if r.kind == TRAIN]
    bound = max(work / slots if slots else 0.0, chain)
    return Figures(slots, makespan, bound, work / slots if slots else 0.0, chain,
                   idle_ready / (slots * makespan) if slots and makespan else 0.0,
                   sum(startups) / len(startups) if startups else 0.0,
                   sum(r.kind == TRAIN for r in records), sum(r.kind == EVALUATE for r in records))


# ---------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class SimTrial:
    """A trial as the simulation sees it: the evaluations it asks for when it starts."""

    id: str
    evaluations: tuple[Job, ...]


@dataclass
class Simulation:
    records: list[TaskRecord]
    trials_started: dict[str, float] = field(default_factory=dict)


def simulate(trainings: Iterable[Job], trials: Sequence[SimTrial], capacity: Resources, max_concurrent: int,
             duration: "callable[[Job], float]" = lambda job: job.expected_s, startup_s: float = 0.0,
             trial_start_s: float = 0.0) -> Simulation:
    """Replay a sweep on ``capacity``: the pipeline's ``trainings`` queued at time 0,
    ``trials`` admitted in order, at most ``max_concurrent`` at once (as Tune admits
    them), each adding its evaluations when it starts (``trial_start_s`` later) and ending
    when they are done. Every decision is :class:`Scheduler`'s; a job runs
    ``duration(job)`` seconds, trainings ``startup_s`` more (process and Train start-up)."""
    scheduler = Scheduler(capacity)
    for job in trainings:
        scheduler.add(job)
    clock = 0.0
    ready_at: dict[str, float] = {job_id: 0.0 for job_id in scheduler.waiting}
    granted_at: dict[str, float] = {}
    model_at: dict[str, float] = {}
    open_evaluations: dict[str, int] = {}
    pending = list(trials)
    records: list[TaskRecord] = []
    events: list[tuple[float, int, str, str]] = []  # (time, tie-break, what, id)
    tie = itertools.count()
    running_trials = 0
    result = Simulation(records)

    def admit() -> None:
        nonlocal running_trials
        while pending and running_trials < max_concurrent:
            trial = pending.pop(0)
            running_trials += 1
            result.trials_started[trial.id] = clock
            heapq.heappush(events, (clock + trial_start_s, next(tie), "trial", trial.id))
            open_evaluations[trial.id] = len(trial.evaluations)

    by_id = {t.id: t for t in trials}
    admit()
    while True:
        for job in scheduler.start():
            granted_at[job.id] = clock
            extra = startup_s if job.kind == TRAIN else 0.0
            heapq.heappush(events, (clock + extra + duration(job), next(tie), "end", job.id))
        if not events:
            break
        clock, _, what, ident = heapq.heappop(events)
        if what == "trial":
            trial = by_id[ident]
            if not trial.evaluations:
                running_trials -= 1
                admit()
            for job in trial.evaluations:
                scheduler.add(job)
                if job.model in model_at:
                    ready_at[job.id] = clock
            continue
        job = scheduler.finish(ident)
        start = granted_at[job.id] + (startup_s if job.kind == TRAIN else 0.0)
        records.append(TaskRecord(job.id, job.kind, job.model, job.trial, job.needs, ready_at.get(job.id, 0.0),
                                  granted_at[job.id], start, clock))
        if job.kind == TRAIN:
            model_at[job.model] = clock
            scheduler.model_ready(job.model)
            for _, waiting in scheduler.waiting.values():
                if waiting.kind == EVALUATE and waiting.model == job.model:
                    ready_at.setdefault(waiting.id, clock)
        elif job.trial is not None:
            open_evaluations[job.trial] -= 1
            if open_evaluations[job.trial] == 0:
                running_trials -= 1
                admit()
    stuck = [job.id for _, job in scheduler.waiting.values()]
    assert not stuck, f"simulation ended with jobs that never fit the capacity: {stuck[:3]}"
    return result


# ---------------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Costs:
    """Resource-hours of a sweep's jobs (``unit``: GPU, or CPU where trials hold no GPU)."""

    unit: str
    training_hours: float
    evaluation_hours: float
    per_trial: dict[str, float]  # hours attributed to each trial

    @property
    def total_hours(self) -> float:
        return self.training_hours + self.evaluation_hours

    def share(self, trial: str) -> float:
        return self.per_trial.get(trial, 0.0) / self.total_hours if self.total_hours else 0.0


def costs(records: Sequence[TaskRecord], unit: str) -> Costs:
    """A job costs its held seconds x its ``unit`` resources. A trial's hours are its own
    evaluations and trainings plus, for a model the pipeline trained, an equal part among
    the trials that evaluated it (so the trials' hours add up to the sweep's, except for
    models no trial of this run evaluated)."""
    def hours(r: TaskRecord) -> float:
        return r.held_seconds() * r.resources.get(unit, 0.0) / 3600

    per_trial: dict[str, float] = {}
    users: dict[str, set[str]] = {}
    for r in records:
        if r.trial is not None:
            per_trial[r.trial] = per_trial.get(r.trial, 0.0) + hours(r)
        if r.kind == EVALUATE and r.trial is not None:
            users.setdefault(r.model, set()).add(r.trial)
    for r in records:
        if r.kind == TRAIN and r.trial is None and users.get(r.model):
            for trial in users[r.model]:
                per_trial[trial] += hours(r) / len(users[r.model])
    return Costs(unit, sum(hours(r) for r in records if r.kind == TRAIN), sum(hours(r) for r in records if r.kind == EVALUATE), per_trial)
