"""Speed benchmarks: seed-style baselines against adl-llm's own paths (`python -m bench.run --help`)."""
