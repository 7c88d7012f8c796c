"""The benchmarks behind ``rabo bench``: harnesses that print measured ratios from one run.

Apart from the server (``coordinator/``) and the algorithm (``rabo/``), like torchtitan's
``benchmarks/``: a bench may import ``rabo``, ``rabo_proto``, ``coordinator`` and ``worker``;
none of those imports a bench. Installed with the package (``rabo bench transport`` measures
any installation), registered as ``rabo bench`` commands through the ``rabo.commands``
entry-point group (``bench.cli:register``). ``bench.measure`` is the one fresh-process time
and peak-memory measurement the estimator and per-ratio benches share.
"""
