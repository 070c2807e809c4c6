"""Structured-output benchmark: the grammar libraries side by side, then the engine with a schema.

Run (sections 1-2 compare every library that is importable; the peers are not in the dev lock,
see docs/BENCHMARKS.md for the scratch venv they ran in):
    OMP_NUM_THREADS=2 python3 bench/structured.py --sections 1,2
    OMP_NUM_THREADS=2 python3 bench/structured.py --sections 3 --checkpoint weights/shakespeare-char
    OMP_NUM_THREADS=2 python3 bench/structured.py --sections 3 --checkpoint gpt2-small

Prints, on both of our vocabularies (GPT-2's 50,257 byte-level BPE tokens from ``model/bpe`` and
the shipped char model's 65 characters, plus a virtual end token):
1. what each library supports: JSON schema (the test schemas of ``tests/structured_schemas.py``
   that it compiles), regex, choice, a context-free grammar, and on the char vocabulary;
2. schema compile time p50/p99 over those schemas, and the per-step mask time for 1 and 32
   constrained rows (each row walks the schemas in turn with random allowed tokens; median ms
   per step, all rows together), per library; on the char vocabulary, which can write none of
   the schemas' objects, a regex and a choice instead;
3. engine tokens/s with and without a constraint at 1 and 32 streams (greedy, the same number of
   tokens each, CPU fp32, one thread) and their ratio, with the chosen library (gptserve's own
   path): a JSON schema on BPE, a regex on the char vocabulary (it cannot write JSON).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from structured_schemas import SCHEMAS  # noqa: E402

from model import CharTokenizer, TiktokenTokenizer, load_checkpoint  # noqa: E402

REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CHOICES = ["yes", "no", "To be, or not to be"]
LARK_CFG = 'start: expr\nexpr: term ("+" term)*\nterm: "(" expr ")" | /[0-9]/'
EBNF_CFG = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= "(" expr ")" | [0-9]'


class Vocab:
    """A vocabulary as the libraries take it: every token's bytes, and an end token (a virtual
    one past the char vocabulary, which has none)."""

    def __init__(self, name: str, tokenizer) -> None:
        self.name, self.tokenizer = name, tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.eos = tokenizer.eot_id
        if self.eos is None:
            self.eos = len(self.tokens)
            self.tokens.append(b"")
        self.size = len(self.tokens)


class Library:
    """One grammar library behind four calls: compile a constraint, make a matcher, fill the
    masks of several matchers into an int32 bitmask (rows, ceil(V / 32)), consume a token."""

    name = ""

    def compile(self, kind: str, spec: str): ...
    def matcher(self, compiled): ...
    def fill(self, matchers: list, bitmask: torch.Tensor) -> None: ...
    def consume(self, matcher, token: int) -> bool: ...


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, vocab: Vocab) -> None:
        import llguidance

        from service.engine.grammar import grammar_tokenizer
        self.llg = llguidance
        self.tokenizer = grammar_tokenizer(vocab.tokenizer)

    def compile(self, kind: str, spec: str):
        from service.engine.grammar import grammar_text
        matcher = self.llg.LLMatcher(self.tokenizer, grammar_text(kind, spec), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, bitmask):  # as the engine does (service.engine.grammar.StepMasks)
        size = bitmask.shape[1] * 4
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), size)

    def consume(self, matcher, token):
        return matcher.consume_token(token)


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, vocab: Vocab) -> None:
        import xgrammar
        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo(vocab.tokens, xgrammar.VocabType.RAW,
                                      vocab_size=vocab.size, stop_token_ids=[vocab.eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, kind, spec):
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(spec, any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            return c.compile_regex("|".join(_escape(s) for s in json.loads(spec)))
        return c.compile_grammar(spec)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def consume(self, matcher, token):
        return matcher.accept_token(token)


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, vocab: Vocab) -> None:
        import outlines_core
        self.oc = outlines_core
        ids: dict[bytes, list[int]] = {}
        for i, token in enumerate(vocab.tokens):
            if i != vocab.eos and token:
                ids.setdefault(token, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(vocab.eos, ids)

    def compile(self, kind, spec):
        if kind == "json":
            regex = self.oc.json_schema.build_regex_from_schema(spec, whitespace_pattern="")
        elif kind == "regex":
            regex = spec
        elif kind == "choice":
            regex = "|".join(_escape(s) for s in json.loads(spec))
        else:
            raise ValueError("no context-free grammars (regular languages only)")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matchers, bitmask):
        width = bitmask.shape[1]
        for i, guide in enumerate(matchers):
            row = bitmask[i]
            guide.write_mask_into(row.data_ptr(), width, 4)

    def consume(self, matcher, token):
        matcher.advance(token)
        return True


def _escape(text: str) -> str:
    import re
    return re.escape(text)


LIBRARIES: tuple[type[Library], ...] = (LLGuidance, XGrammar, OutlinesCore)


def vocabularies() -> list[Vocab]:
    char = load_checkpoint(ROOT / "weights" / "shakespeare-char").tokenizer
    assert isinstance(char, CharTokenizer)
    return [Vocab("GPT-2 BPE (50,257)", TiktokenTokenizer.by_name("gpt2")),
            Vocab("char (65 + end)", char)]


def _try(fn: Callable[[], object]) -> tuple[bool, str]:
    try:
        fn()
        return True, ""
    except Exception as err:  # noqa: BLE001 (a benchmark reports every library's failure)
        return False, f"{type(err).__name__}: {str(err)[:60]}"


def support_table(vocabs: list[Vocab]) -> None:
    print("\n1. What each library supports (compiles on this vocabulary)")
    cases = [("json: test schemas", None), ("regex (a date)", ("regex", REGEX)),
             ("choice", ("choice", json.dumps(CHOICES))), ("grammar (Lark / GBNF)", None)]
    for vocab in vocabs:
        print(f"  {vocab.name}")
        for cls in LIBRARIES:
            lib = _load(cls, vocab)
            if lib is None:
                continue
            cells = []
            for label, case in cases:
                if label.startswith("json"):
                    ok = sum(_try(lambda s=s, lib=lib: lib.compile("json", json.dumps(s)))[0]
                             for s in SCHEMAS.values())
                    cells.append(f"{label} {ok}/{len(SCHEMAS)}")
                elif label.startswith("grammar"):
                    spec = LARK_CFG if cls is LLGuidance else EBNF_CFG
                    ok, why = _try(lambda spec=spec, lib=lib: lib.compile("grammar", spec))
                    cells.append(f"{label} {'yes' if ok else 'no (' + why + ')'}")
                else:
                    ok, why = _try(lambda case=case, lib=lib: lib.compile(*case))
                    cells.append(f"{label} {'yes' if ok else 'no (' + why + ')'}")
            print(f"    {cls.name:14s} " + "; ".join(cells))


def _load(cls: type[Library], vocab: Vocab) -> Library | None:
    try:
        return cls(vocab)
    except ImportError:
        print(f"    {cls.name:14s} not installed")
        return None


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timings(vocabs: list[Vocab], steps: int, seed: int) -> None:
    print("\n2. Compile time over the test schemas (ms) and mask time per step (ms, all rows)")
    print(f"  {'vocabulary':20s} {'library':14s} {'compile p50':>11s} {'p99':>8s} "
          f"{'mask 1 row':>10s} {'mask 32 rows':>12s}")
    for vocab in vocabs:
        for cls in LIBRARIES:
            lib = _load(cls, vocab)
            if lib is None:
                continue
            compiled, times = [], []
            for schema in SCHEMAS.values():
                t0 = time.perf_counter()
                ok, _ = _try(lambda s=schema, lib=lib, out=compiled:
                             out.append(lib.compile("json", json.dumps(s))))
                if ok:
                    times.append((time.perf_counter() - t0) * 1e3)
            if vocab.eos >= vocab.tokenizer.vocab_size:  # the char vocabulary: what it can say
                compiled = [lib.compile("regex", "[A-Z][a-z]{2,8}( [a-z]{2,8}){0,6}[.!?]"),
                            lib.compile("choice", json.dumps(CHOICES))]
            if not compiled:
                print(f"  {vocab.name:20s} {cls.name:14s} compiles none of the schemas")
                continue
            masks = [_mask_time(lib, vocab, compiled, rows, steps, seed) for rows in (1, 32)]
            p50 = statistics.median(times) if times else float("nan")
            p99 = _pct(times, 0.99) if times else float("nan")
            print(f"  {vocab.name:20s} {cls.name:14s} {p50:11.2f} {p99:8.2f} "
                  f"{masks[0]:10.3f} {masks[1]:12.3f}")


def _mask_time(lib: Library, vocab: Vocab, compiled: list, rows: int, steps: int,
               seed: int) -> float:
    """Median ms to fill ``rows`` masks, row r walking ``compiled[r]`` (cyclically) with random
    allowed tokens and moving on to the next grammar when it finishes, over ``steps`` steps."""
    rng = random.Random(seed)
    width = (vocab.size + 31) // 32
    bitmask = torch.zeros(rows, width, dtype=torch.int32)
    walking = list(range(rows))  # which grammar each row walks
    matchers = [lib.matcher(compiled[r % len(compiled)]) for r in range(rows)]
    times = []
    bits = torch.arange(32, dtype=torch.int32)
    for _ in range(steps):
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        times.append(time.perf_counter() - t0)
        allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(1)[:, : vocab.size]
        for r in range(rows):
            ids = allowed[r].nonzero().flatten().tolist()
            token = rng.choice(ids) if ids else vocab.eos
            if token == vocab.eos or not lib.consume(matchers[r], token):
                walking[r] += rows
                matchers[r] = lib.matcher(compiled[walking[r] % len(compiled)])
    return statistics.median(times) * 1e3


def engine_throughput(checkpoint: str, new_tokens: int, rounds: int) -> None:
    """Section 3: gptserve's engine, greedy, with and without a constraint, interleaved.

    One intra-op thread, so the calling thread's CPU time (``time.thread_time``) is all the
    work: tokens per CPU second compare the two like for like even on a busy machine, where
    wall-clock tokens/s (printed beside) is at the neighbours' mercy."""
    from service.engine import Engine, EngineConfig, Request, SamplingParams
    from service.engine.constraints import structured_outputs
    ckpt = _checkpoint(checkpoint)
    engine = Engine(ckpt, EngineConfig(device="cpu", dtype="float32", max_batch_size=32,
                                       threads=1))
    char = ckpt.tokenizer.eot_id is None
    # a constraint that never ends within new_tokens, so both sides generate as many tokens;
    # the char vocabulary cannot write JSON at all: a regex there
    structured = (structured_outputs(regex="[a-z ]+") if char else structured_outputs(json={
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "minItems": 4 * new_tokens}))
    prompt = tuple(ckpt.tokenizer.encode("ROMEO:"))
    print(f"\n3. Engine tokens/s with vs without a constraint ({checkpoint}, CPU fp32, one "
          f"thread, {new_tokens} tokens per stream, best of {rounds}, interleaved)")
    print(f"  constraint: {structured.kind} {structured.spec}")
    print(f"  {'streams':>7s} {'plain tok/cpu-s':>15s} {'constrained':>11s} {'ratio':>6s}"
          f" {'| wall tok/s plain':>18s} {'constrained':>11s} {'ratio':>6s}")
    for streams in (1, 32):
        best = {k: [0.0, 0.0] for k in ("plain", "constrained")}  # [per cpu-s, per wall-s]
        for r in range(rounds):
            for label, so in (("plain", None), ("constrained", structured)):
                params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True,
                                        structured=so)
                reqs = [Request(f"{label}{r}-{i}", prompt, params) for i in range(streams)]
                c0, t0 = time.thread_time(), time.perf_counter()
                out = engine.run(reqs)
                cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
                tokens = sum(e.token_id is not None for v in out.values() for e in v)
                assert tokens == streams * new_tokens, f"{label}: {tokens} tokens"
                best[label] = [max(best[label][0], tokens / cpu),
                               max(best[label][1], tokens / wall)]
        (pc, pw), (cc, cw) = best["plain"], best["constrained"]
        print(f"  {streams:7d} {pc:15.1f} {cc:11.1f} {cc / pc:6.2f} | {pw:16.1f} {cw:11.1f}"
              f" {cw / pw:6.2f}")


def _checkpoint(name: str):
    from model import GPT, Checkpoint, GPTConfig
    if name != "gpt2-small":
        return load_checkpoint(name)
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
    tokenizer = TiktokenTokenizer.by_name("gpt2")
    return Checkpoint(GPT(config).eval(), tokenizer, config, "gptserve", Path("gpt2-small"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="1,2,3")
    p.add_argument("--steps", type=int, default=64, help="mask steps per row count (section 2)")
    p.add_argument("--checkpoint", default="weights/shakespeare-char",
                   help="section 3: a checkpoint folder, or 'gpt2-small' (random weights)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sections = {int(s) for s in args.sections.split(",")}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if sections & {1, 2}:
        vocabs = vocabularies()
        if 1 in sections:
            support_table(vocabs)
        if 2 in sections:
            timings(vocabs, args.steps, args.seed)
    if 3 in sections:
        engine_throughput(args.checkpoint, args.new_tokens, args.rounds)


if __name__ == "__main__":
    main()
