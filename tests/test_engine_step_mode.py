"""A step runs in inference mode whether or not its caller is in it (it enters the mode only
when the caller is not), and the engine thread's loop holds the mode for its steps."""

from __future__ import annotations

import asyncio

import torch
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    request,
)


def _spy_modes(eng) -> list[bool]:
    """Whether each forward of ``eng`` ran in inference mode, in order."""
    modes: list[bool] = []
    real = eng._core.runner.model.forward_packed

    def spy(batch, kv):
        modes.append(torch.is_inference_mode_enabled())
        return real(batch, kv)

    eng._core.runner.model.forward_packed = spy
    return modes


def test_a_step_runs_in_inference_mode_whoever_calls_it():
    eng = engine(max_batch_size=2)
    modes = _spy_modes(eng)
    core = eng._core
    core.add_request(request("a", "hello", max_tokens=4, temperature=0.0))
    assert not torch.is_inference_mode_enabled()
    core.step()  # the caller is not in inference mode: the step enters it
    assert not torch.is_inference_mode_enabled(), "the step left inference mode on"
    with torch.inference_mode():
        core.step()  # the caller is: the step runs in it as it is
    assert modes == [True, True], modes


def test_the_engine_thread_calls_its_steps_already_in_inference_mode():
    eng = engine(max_batch_size=2)
    core = eng._core
    entered: list[bool] = []  # the mode as each step is called (before it could enter it)
    real = core.step

    def spy():
        entered.append(torch.is_inference_mode_enabled())
        return real()

    core.step = spy
    eng.start()

    async def main():
        stream = eng.add_request(request("a", "hello", max_tokens=3, temperature=0.0))
        async for _ in stream:
            pass

    try:
        asyncio.run(main())
    finally:
        eng.shutdown(timeout=5)
    assert len(entered) >= 3 and all(entered), entered
