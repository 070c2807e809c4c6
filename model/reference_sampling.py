"""The sampling oracle: the next token, its logprob and top logprobs, from the definitions.

Written from the published definitions, one row at a time, in float64 Python, sharing no code
with the engine's sampler (``model.sampling``, ``service.engine.sampler``), so a bug there shows
up as a disagreement with this module instead of being copied into the reference:

- padded vocabulary rows (ids >= the tokenizer's vocabulary) are never drawn;
- ``repetition_penalty`` r (CTRL, Keskar et al. 2019, as Hugging Face and vLLM apply it): a token
  seen in the prompt or the generated text has its logit divided by r when positive, multiplied
  by r otherwise;
- ``frequency_penalty`` and ``presence_penalty`` (OpenAI's definition):
  ``logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty``, where c[j] counts
  the times token j was generated so far (the prompt does not count);
- ``logit_bias`` (OpenAI): added to the logit of its token;
- ``temperature`` 0 is greedy: the first token with the largest logit. Otherwise the logits are
  divided by the temperature and turned into probabilities, then filtered in this order, each
  filter renormalising what is left: ``top_k`` keeps the tokens whose logit is at least the k-th
  largest; ``top_p`` (nucleus, Holtzman et al. 2019) keeps the most likely tokens while the mass
  before each one is below ``top_p`` (the most likely token always stays); ``min_p`` drops the
  tokens whose probability is below ``min_p`` times the largest one;
- the draw is inverse-CDF: the first token (in id order) whose cumulative probability exceeds
  ``u * total``, with u the counter-based uniform of (the choice's seed, the number of tokens it
  has generated so far), re-implemented here from its definition (``counter_uniform``);
- logprobs: for a sampled token, the log-probability in the distribution it was drawn from
  (after penalties, bias, temperature and filters); for a greedy one, the log-softmax of the
  logits after penalties and bias.

docs/API.md ("Choices made where OpenAI leaves room") states the same rules for users.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ReferenceParams:
    """The sampling settings the oracle reads; the field names are ``SamplingParams``'s."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1.0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias) pairs

    @classmethod
    def like(cls, params: object) -> ReferenceParams:
        """The oracle's copy of any object with these fields (e.g. the engine's params)."""
        values = {name: getattr(params, name) for name in cls.__dataclass_fields__}
        bias = values["logit_bias"]
        values["logit_bias"] = tuple(bias.items() if isinstance(bias, Mapping) else bias)
        return cls(**values)


@dataclass(frozen=True)
class ReferenceToken:
    """One oracle step: the token, its logprob and the ``n`` best alternatives (when asked),
    and ``plausible``: every token a float32 implementation of the same draw could pick (the
    drawn one, plus a neighbour when u * total lies within rounding of a CDF boundary)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    plausible: frozenset[int]


def _hash32(x: int) -> int:
    """Mueller's 32-bit integer hash."""
    x ^= x >> 16
    x = (x * 0x45D9F3B) & _M32
    x ^= x >> 16
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def counter_uniform(seed: int, counter: int) -> float:
    """The uniform in [0, 1) of draw ``counter`` of a choice seeded with ``seed``: the 32-bit
    hash chained over the seed's high and low words and the counter, then two more hashes
    (salted 0x68E31DA4 and 0x35297A4D) give 27 + 26 bits of a float64 mantissa."""
    x = _hash32((seed >> 32) & _M32)
    x = _hash32(x ^ (seed & _M32))
    x = _hash32(x ^ (counter & _M32))
    high = _hash32(x ^ 0x68E31DA4) >> 5
    low = _hash32(x ^ 0x35297A4D) >> 6
    return ((high << 26) | low) / 2**53


def processed_logits(
    logits: Sequence[float],
    params: ReferenceParams,
    prompt: Sequence[int],
    generated: Sequence[int],
    vocab_size: int | None = None,
) -> list[float]:
    """The logits after the padded-vocabulary mask, the penalties and ``logit_bias``."""
    out = [float(x) for x in logits]
    for j in range(vocab_size if vocab_size is not None else len(out), len(out)):
        out[j] = -math.inf
    counts: dict[int, int] = {}
    for token in generated:
        counts[token] = counts.get(token, 0) + 1
    r = params.repetition_penalty
    for j in set(prompt) | set(generated):
        out[j] = out[j] / r if out[j] > 0 else out[j] * r
    for j, c in counts.items():
        out[j] -= c * params.frequency_penalty + params.presence_penalty
    for j, bias in params.logit_bias:
        out[j] += bias
    return out


def _softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def _normalised(probs: list[float]) -> list[float]:
    total = sum(probs)
    return [p / total for p in probs]


def distribution(logits: Sequence[float], params: ReferenceParams) -> list[float]:
    """The probabilities a sampled (temperature > 0) token is drawn from, filters applied."""
    scaled = [x / params.temperature for x in logits]
    if params.top_k > 0:
        kth = heapq.nlargest(params.top_k, scaled)[-1]  # the k-th largest (all, if k > V)
        scaled = [x if x >= kth else -math.inf for x in scaled]
    probs = _softmax(scaled)
    if params.top_p < 1.0:
        kept, mass = set(), 0.0
        for j in sorted(range(len(probs)), key=lambda j: -probs[j]):
            if mass >= params.top_p:
                break
            kept.add(j)
            mass += probs[j]
        probs = _normalised([p if j in kept else 0.0 for j, p in enumerate(probs)])
    if params.min_p > 0.0:
        floor = params.min_p * max(probs)
        probs = _normalised([p if p >= floor else 0.0 for p in probs])
    return probs


def _draw(probs: Sequence[float], u: float, tolerance: float) -> tuple[int, frozenset[int]]:
    """Inverse CDF: the first token whose cumulative mass exceeds ``u * total``; and every token
    whose interval of the CDF lies within ``tolerance * total`` of that target."""
    total = sum(probs)
    target, slack = u * total, tolerance * total
    chosen, plausible, below = None, set(), 0.0
    for j, p in enumerate(probs):
        above = below + p
        if p > 0 and below - slack <= target < above + slack:
            plausible.add(j)
        if chosen is None and above > target and p > 0:
            chosen = j
        below = above
    if chosen is None:  # u * total rounded up to the total: the last token with mass
        chosen = max(j for j, p in enumerate(probs) if p > 0)
        plausible.add(chosen)
    return chosen, frozenset(plausible)


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def next_token(
    logits: Sequence[float],
    params: ReferenceParams,
    *,
    prompt: Sequence[int],
    generated: Sequence[int],
    seed: int,
    vocab_size: int | None = None,
    logprobs: int | None = None,
    tolerance: float = 1e-5,
) -> ReferenceToken:
    """The next token after ``prompt`` + ``generated`` for the last position's ``logits`` (V,),
    with its logprob and ``logprobs`` alternatives when ``logprobs`` is not None."""
    processed = processed_logits(logits, params, prompt, generated, vocab_size)
    if params.temperature == 0:
        best = max(processed)
        token = processed.index(best)
        plausible = frozenset(j for j, x in enumerate(processed) if best - x <= tolerance)
    else:
        probs = distribution(processed, params)
        token, plausible = _draw(probs, counter_uniform(seed, len(generated)), tolerance)
    if logprobs is None:
        return ReferenceToken(token, None, None, plausible)
    if params.temperature == 0:
        norm = best + math.log(sum(math.exp(x - best) for x in processed))
        lps = [x - norm for x in processed]
    else:
        lps = [_log(p) for p in probs]
    order = sorted(range(len(lps)), key=lambda j: -lps[j])[:logprobs]
    return ReferenceToken(token, lps[token], tuple((j, lps[j]) for j in order), plausible)
