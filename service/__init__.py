"""gptserve's serving side: the engine, the HTTP server, and the offline batch API.

``from service import LLM, SamplingParams`` gives offline generation in the caller's thread
(``service.llm``); ``python -m service`` runs the HTTP server. Nothing is imported until asked for,
so importing ``service`` loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM", "Completion", "EngineConfig", "GenerationResult", "SamplingParams",
           "structured_outputs"]

if TYPE_CHECKING:
    from service.engine import EngineConfig, SamplingParams, structured_outputs
    from service.llm import LLM, Completion, GenerationResult


def __getattr__(name: str):
    if name in ("LLM", "Completion", "GenerationResult"):
        from service import llm

        return getattr(llm, name)
    if name in ("EngineConfig", "SamplingParams", "structured_outputs"):
        from service import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
