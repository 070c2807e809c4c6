"""The HTTP edge: listening sockets (``sockets``), the connection cap (``listener``) and the
per-connection limits (``limits``, enforced by ``protocol``).

Import the submodules directly: ``sockets`` and ``limits`` are light (``python -m service`` binds
before importing the web framework and torch); ``listener`` and ``protocol`` pull in uvicorn.
"""
