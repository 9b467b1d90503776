"""App modules for ``benchmarks/compare.py``: one FastAPI app per configuration.

Every module exposes ``app`` (configured by ``COMPARE_*`` / ``BUDGET_*`` environment variables) with
the same endpoint (``GET /``, a tiny JSON body, see ``common.py``) and an unmetered ``GET /__rtt``
that reports the requests served and the Redis round trips and commands the process sent.
"""
