"""``rabo bench ...``: every bench's command, registered through the ``rabo.commands``
entry-point group. Importing this module imports no torch and no gRPC: each bench's module
is imported when its command runs (``rabo --help`` stays fast)."""

from __future__ import annotations

import argparse

from rabo.cliargs import lazy


def register(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    from bench.estimator import add_arguments as add_estimator_args
    from bench.network import add_network_args
    from bench.policy import add_policy_args
    from bench.system import add_system_args
    from bench.transport import add_compare_args, add_load_args, add_transport_args

    commands = (
        ("estimator", "estimator accuracy, time and memory vs exact", add_estimator_args,
         "bench.estimator", "main"),
        ("transport", "round trip of a P-parameter model, no compute", add_transport_args,
         "bench.transport", "cmd_bench_transport"),
        ("compare-transports", "the same job over gRPC and gloo", add_compare_args,
         "bench.transport", "cmd_compare_transports"),
        ("network", "a real job across network namespaces with tbf-limited links",
         add_network_args, "bench.network", "cmd_bench_network"),
        ("load", "N simulated workers register and heartbeat at once", add_load_args,
         "bench.transport", "cmd_bench_load"),
        ("policy", "the ratio policy's memory estimate against real workers' peaks",
         add_policy_args, "bench.policy", "cmd_bench_policy"),
        ("system", "round overhead, coordinator CPU and wire bytes vs workers and model size; "
                   "gRPC vs gloo; per-ratio cost", add_system_args, "bench.system",
         "cmd_bench_system"),
    )
    for name, help_text, add_args, module, fn in commands:
        p = bench_sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=lazy(module, fn))
