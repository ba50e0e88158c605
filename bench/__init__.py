"""Benchmarks measured side by side: `python -m bench.run` writes bench/results.json and
BENCHMARKS.md (scoring combinations, LoRA training, FLOP utilisation, scaling, end to end)."""
