"""Planner and simulator: a cost model of GPUs and links, a simulator that drives the engine's own
scheduler, a vLLM-style baseline, and the planner that ranks layout pairs (docs/planner.md)."""
