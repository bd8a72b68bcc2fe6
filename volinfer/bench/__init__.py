"""Benchmark harness: peak RSS and time of volinfer against naive whole-volume inference (and MONAI), each in a fresh
process. Entry points: ``volinfer bench`` and ``benchmarks/memory_reduction.py``."""
