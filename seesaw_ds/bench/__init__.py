"""Benchmark helpers for ``launch/bench.py``: workloads (``workloads``), the machine's measure (``machine``),
the peers and how each runs (``peers``, ``hf_peer``, ``vllm_peer``), the report arithmetic (``report``),
py-spy profiles (``profile``), the app's settings (``config``, ``cli``) and one whole run (``runner``)."""
