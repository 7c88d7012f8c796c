"""Experiments that test the paper's claims (``rabo experiment ...``) and the results report.

Each group writes ``<out>/<group>.json`` (default ``docs/results``) and its PNG plots;
``rabo experiment report`` rebuilds ``docs/RESULTS.md`` from those JSON files alone.
"""
