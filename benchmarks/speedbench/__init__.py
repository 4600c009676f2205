"""The speed benchmark's parts: ``harness`` (timing, memory, environment, cold start, the shared context),
``sections`` (what is measured) and ``report`` (output paths, targets, JSON and Markdown). ``benchmarks/speed.py``
is its command line."""
