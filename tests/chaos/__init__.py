"""Chaos harness: replicas of ``server_app`` on real servers sharing one real ``redis-server``, a mixed
client load, injected faults (SIGKILL, Redis restarts, SIGTERM), and exact ground-truth accounting.

``harness.run_chaos`` runs one scenario and returns a ``ChaosReport``; ``test_chaos.py`` is the fast
CI variant and ``benchmarks/soak.py`` the long one. Modules: ``procs`` (the processes), ``load``
(the client driver), ``harness`` (faults, sampler, accounting, report).
"""
