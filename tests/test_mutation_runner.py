"""mutations/run.py: only a failing test counts as caught; a timeout or a run that cannot
import or collect the tests is reported apart and fails the run."""

import pytest

from mutations import run as runner


def mutation(id_: str = "m") -> runner.Mutation:
    return runner.Mutation(id_, "methods/mdps.py", "a", "b", ("tests/test_mdps.py",), "why", "mdps.yaml")


@pytest.mark.parametrize(
    "code, verdict",
    [(1, runner.Verdict.CAUGHT), (0, runner.Verdict.SURVIVED), (None, runner.Verdict.TIMEOUT), (2, runner.Verdict.ERROR), (3, runner.Verdict.ERROR)],
)
def test_only_a_failing_test_catches_a_mutation(monkeypatch, code, verdict):
    monkeypatch.setattr(runner, "run_in_copy", lambda m, tests, timeout: (code, "output"))
    outcome = runner.run_mutation(mutation(), timeout=1.0)
    assert outcome.verdict is verdict and outcome.caught == (verdict is runner.Verdict.CAUGHT)


def test_summary_counts_caught_survived_and_timed_out_apart():
    verdicts = [runner.Verdict.CAUGHT] * 3 + [runner.Verdict.SURVIVED, runner.Verdict.TIMEOUT, runner.Verdict.TIMEOUT]
    outcomes = [runner.Outcome(mutation(str(i)), v, 0.0) for i, v in enumerate(verdicts)]
    assert runner.summary(outcomes) == "3 caught, 1 survived, 2 timed out of 6"
    outcomes.append(runner.Outcome(mutation("e"), runner.Verdict.ERROR, 0.0))
    assert runner.summary(outcomes) == "3 caught, 1 survived, 2 timed out, 1 errored of 7"


@pytest.mark.parametrize("code, status", [(1, 0), (None, 1), (0, 1)])
def test_exit_status_is_nonzero_unless_every_mutation_is_caught(monkeypatch, capsys, code, status):
    monkeypatch.setattr(runner, "run_in_copy", lambda m, tests, timeout: (code, ""))
    assert runner.main(["--id", "mdps-eq5-batch-sum", "--no-sanity"]) == status
    last = capsys.readouterr().out.strip().splitlines()[-1]
    expected = {1: "1 caught, 0 survived, 0 timed out of 1", None: "0 caught, 0 survived, 1 timed out of 1", 0: "0 caught, 1 survived, 0 timed out of 1"}
    assert last == expected[code]
