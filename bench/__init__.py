"""Benchmarks: plain scripts (``python bench/NAME.py [--quick]``) that print ratios against raw baselines measured in
the same run on the same machine. ``bench/common.py`` holds what they share; see ``bench/RESULTS.md``."""
