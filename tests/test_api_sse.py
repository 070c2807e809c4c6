"""SSE framing: the per-token fast path writes exactly the bytes the general path writes."""

from __future__ import annotations

import json
import random

from service.api import sse


def test_text_chunk_fast_path_is_byte_identical_to_the_json_encoder():
    frame = sse.ChunkFramer(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 7,
            "model": "m",
            "system_fingerprint": None,
        }
    )
    rng = random.Random(0)
    alphabet = ["a", " ", "\n", '"', "\\", "\x00", "\x1f", "\u2028", "é", "€", "🎉", "\ufffd"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        index = rng.randint(0, 40)
        fast = frame.text(index, text)
        general = frame.choice(
            {"index": index, "text": text, "logprobs": None, "finish_reason": None}
        )
        assert fast == general, (text, fast, general)
        assert json.loads(fast.decode("utf-8")[6:])["choices"][0]["text"] == text


def test_chat_chunk_fast_path_is_byte_identical_to_the_json_encoder():
    frame = sse.ChunkFramer(
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"},
        chat=True,
    )
    rng = random.Random(1)
    alphabet = ["a", " ", "\n", '"', "\\", "\x00", "\u2028", "é", "🎉"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        index = rng.randint(0, 15)
        fast = frame.text(index, text)
        general = frame.choice(
            {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        )
        assert fast == general, (text, fast, general)
