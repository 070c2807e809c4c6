"""Which layer imports which, and what a request does not redo.

The HTTP transport (``service.transport``) sits under the API: it builds its own error envelope
and imports nothing of ``service.api``. A checkpoint's ``system_fingerprint`` (JSON + SHA-1 of its
provenance and shape) is computed once per loaded model, not once per request. The offline API's
own check is tests/test_llm_offline.py::test_the_offline_api_imports_nothing_of_the_http_layer.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
from conftest import live_server


def test_the_transport_imports_nothing_of_the_api_layer():
    code = (
        "import sys, service.transport.protocol, service.transport.listener; "
        "print(sorted(m for m in sys.modules if m.startswith(('service.api', 'service.reload', "
        "'fastapi'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the transport pulls in the API layer: {out.stdout}"


def test_the_fingerprint_is_computed_once_per_loaded_model_not_per_request(
    tiny_checkpoint, monkeypatch
):
    import service.api.state

    computed = []
    real = service.api.state.system_fingerprint

    def counted(engine):
        computed.append(engine)
        return real(engine)

    monkeypatch.setattr(service.api.state, "system_fingerprint", counted)
    with live_server(tiny_checkpoint) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        body = {"prompt": "ab", "max_tokens": 2}
        answers = [http.post("/v1/completions", json=body).json() for _ in range(4)]
        engine = srv.state.engine
    fingerprints = {answer["system_fingerprint"] for answer in answers}
    assert len(fingerprints) == 1 and None not in fingerprints, fingerprints
    assert computed == [engine], f"computed {len(computed)} times for 4 requests on one model"
