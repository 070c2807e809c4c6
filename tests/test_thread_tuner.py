"""The thread tuner (model/tuner.py), driven by a simulated machine: step times per thread count
that change when a neighbour arrives or leaves, on a fake clock. Plain Python, no torch.

The simulated costs are the shapes measured on the 2-core VM (docs/BENCHMARKS.md, "A busy
neighbour"): quiet, two threads beat one; with a neighbour, two threads lose to one.
"""

from __future__ import annotations

import random

import pytest

from model.tuner import ThreadTuner, ladder

QUIET = {1: 0.040, 2: 0.027}  # seconds per one-row decode step
NEIGHBOUR = {1: 0.041, 2: 0.110}


class Machine:
    """Steps of one shape on a fake clock; each costs ``costs[threads]`` with some jitter and an
    occasional slow outlier (a GC pause)."""

    def __init__(self, costs: dict[int, float], seed: int = 0) -> None:
        self.costs = costs
        self.now = 0.0
        self.rng = random.Random(seed)

    def clock(self) -> float:
        return self.now

    def run(self, tuner: ThreadTuner, seconds: float, key=(1, 0)) -> list[int]:
        """Step for ``seconds`` of simulated time; the thread count of every step."""
        used, end = [], self.now + seconds
        while self.now < end:
            threads = tuner.threads
            cost = self.costs[threads] * self.rng.uniform(0.93, 1.07)
            if self.rng.random() < 0.03:
                cost *= 2.5
            self.now += cost
            tuner.observe(key, cost)
            used.append(threads)
        return used


def test_the_ladder_doubles_up_to_the_maximum_which_is_always_on_it():
    assert ladder(1) == (1,)
    assert ladder(2) == (1, 2)
    assert ladder(6) == (1, 2, 4, 6)
    assert ladder(8) == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="max_threads"):
        ThreadTuner(0)


@pytest.mark.parametrize("seed", range(5))
def test_a_quiet_machine_keeps_every_thread_and_probes_less_and_less(seed):
    machine = Machine(QUIET, seed)
    tuner = ThreadTuner(2, clock=machine.clock)
    used = machine.run(tuner, 120.0)
    assert tuner.current == 2, "left the faster count on a quiet machine"
    # a run of slow outliers may mislead one probe; the next one (a second later) corrects it
    assert tuner.switches <= 2, f"moved {tuner.switches} times on a quiet machine"
    share = used.count(2) / len(used)
    assert share > 0.97, f"only {share:.3f} of the steps ran on the faster count"
    late = used[len(used) // 2:]  # backed off: at most one probe per max_interval (64 s)
    probes = sum(1 for a, b in zip(late, late[1:], strict=False) if a == 2 and b == 1)
    assert probes <= 2, f"{probes} probes in the last minute"


@pytest.mark.parametrize("seed", range(5))
def test_a_neighbour_arriving_moves_to_one_thread_within_a_second(seed):
    machine = Machine(QUIET, seed)
    tuner = ThreadTuner(2, clock=machine.clock)
    machine.run(tuner, 120.0)  # settled and backed off
    machine.costs = NEIGHBOUR
    used = machine.run(tuner, 1.0)
    assert tuner.current == 1, f"still at {tuner.current} a second after the neighbour came"
    used = machine.run(tuner, 60.0)
    share = used.count(1) / len(used)
    assert share > 0.95, f"only {share:.3f} of the steps ran on one thread with the neighbour"


@pytest.mark.parametrize("seed", range(5))
def test_the_neighbour_leaving_brings_every_thread_back_within_the_longest_interval(seed):
    machine = Machine(NEIGHBOUR, seed)
    tuner = ThreadTuner(2, clock=machine.clock)
    machine.run(tuner, 120.0)
    assert tuner.current == 1
    machine.costs = QUIET
    machine.run(tuner, 64.0 + 1.0)
    assert tuner.current == 2, "the quiet machine was not noticed within max_interval"


def test_probes_compare_only_steps_of_the_same_shape():
    """A probe whose steps are all of a shape never seen at the current count decides nothing:
    a prefill step is slower than a decode step, whatever the thread count."""
    machine = Machine({1: 0.030, 2: 0.027}, seed=1)
    tuner = ThreadTuner(2, clock=machine.clock, min_interval=0.5)
    machine.run(tuner, 0.6, key="decode")
    assert tuner.threads == 1  # probing now
    machine.costs = {1: 0.005, 2: 0.27}
    machine.run(tuner, 0.1, key="prefill")  # cheap only because it is another shape
    assert tuner.current == 2 and tuner.switches == 0


def test_one_thread_is_all_a_single_cpu_gets():
    machine = Machine({1: 0.03}, seed=0)
    tuner = ThreadTuner(1, clock=machine.clock)
    assert set(machine.run(tuner, 30.0)) == {1}
