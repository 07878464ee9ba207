"""Benchmarks: each module exposes run() -> list[dict] (rows for bench/run_all.py) and runs as a script."""
