"""``python tests/blocking_server.py ARGS``: ``python -m service ARGS`` whose checkpoint loader
blocks, on purpose, on any checkpoint folder named ``blocked``.

Not a test module: tests/test_reload_supervision.py runs it to prove that a load stuck in the
kernel (a hung network mount, a read that never returns) cannot keep the server from answering,
from reloading later, or from exiting on SIGTERM. The stuck loader prints ``loader blocked on
purpose`` and opens the FIFO named by ``GPTSERVE_TEST_RELEASE`` for reading, which blocks until
the test opens it for writing (or forever); then it loads the checkpoint for real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import model.checkpoint

_real_load = model.checkpoint.load_checkpoint


def _blocking_load(path, *args, **kwargs):
    if Path(os.path.realpath(path)).name == "blocked":  # the reloader reads via /proc/self/fd/N
        print("loader blocked on purpose", file=sys.stderr, flush=True)
        with open(os.environ["GPTSERVE_TEST_RELEASE"], "rb"):
            pass
    return _real_load(path, *args, **kwargs)


if __name__ == "__main__":
    model.checkpoint.load_checkpoint = _blocking_load  # before service imports it by name
    from service.__main__ import main

    sys.exit(main(sys.argv[1:]))
