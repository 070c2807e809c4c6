"""Parts of ``bench/peers.py``: gptserve measured side by side with vLLM, CTranslate2 and HF.

- ``models``: the GPT-2-small-shaped random model and the shipped tiny one as Hugging Face
  folders (and CTranslate2 conversions), cached in a work folder; the prompts.
- ``servers``: HTTP servers (gptserve, vLLM in its own virtualenv) started and stopped one at a
  time.
- ``load``: the one async load generator (httpx, SSE) and the figures it yields.
- ``inproc``: in-process generation (gptserve's engine facade, CTranslate2, HF ``generate``).
- ``limits``: this machine's matmul FLOP/s and memory read bandwidth.
- ``report``: the table and the ratios the issue's targets name.
"""
