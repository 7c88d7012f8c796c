"""Benchmarks behind ``rabo bench``: each prints measured ratios from one run."""
