"""Bad flags and environment variables: a clear error that names the flag or variable and the
allowed values, exit status 2, no traceback; and one bad RABO_* variable does not break the
commands that never read it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rabo.cli import main as rabo_main
from worker.cli import main as worker_main


def _refused(fn, monkeypatch, capsys, env: dict[str, str], argv: list[str],
             message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, err = _run(fn, argv, capsys)
    assert rc == 2 and message in err, err


def _run(fn, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = fn(argv)
    except SystemExit as exc:  # argparse reports through parser.error
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize(("env", "argv", "message"), [
    ({"RABO_HEALTH_PORT": "x"}, ["coordinator"],
     "argument --health-port: 'x' is not an integer (flag or env RABO_HEALTH_PORT)"),
    ({}, ["coordinator", "--metrics-port", "70000"],
     "argument --metrics-port: 70000 is out of range: 0..65535"),
    ({}, ["coordinator", "--bind", "nonsense"],
     "--bind 'nonsense': expected HOST:PORT with a port in 0..65535"),
    ({}, ["coordinator", "--bind", "127.0.0.1:99999"], "port in 0..65535"),
    ({}, ["local", "--workers", "0", "--out", "unused"], "--workers must be at least 1"),
    ({}, ["config", "--set", "outer.lr=.inf"], "outer.lr: must be a finite number"),
    ({}, ["dist", "--timeout-s", "-5"], "argument --timeout-s: '-5': expected a finite"),
])
def test_rabo_refuses_bad_flags_and_env_by_name(monkeypatch, capsys, env, argv,
                                                message) -> None:
    _refused(rabo_main, monkeypatch, capsys, env, argv, message)


def test_a_bad_variable_only_troubles_the_commands_that_read_it(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RABO_THREADS", "four")
    monkeypatch.setenv("RABO_HEALTH_PORT", "x")
    rc, _ = _run(rabo_main, ["config", "--set", "rounds=3"], capsys)
    assert rc == 0


@pytest.mark.parametrize(("env", "argv", "message"), [
    ({"RABO_THREADS": "four"}, ["--coordinator", "127.0.0.1:1"],
     "argument --threads: 'four' is not an integer (flag or env RABO_THREADS)"),
    ({"RABO_CLIENT_ID": "-2"}, ["--coordinator", "127.0.0.1:1"],
     "argument --client-id: -2 is out of range: >= -1"),
    ({}, ["--coordinator", "nonsense"],
     "--coordinator 'nonsense': expected HOST:PORT with a port in 1..65535"),
    ({}, ["--coordinator", "127.0.0.1:1", "--memory-limit", "lots"], "--memory-limit"),
])
def test_worker_refuses_bad_flags_and_env_by_name(monkeypatch, capsys, env, argv,
                                                  message) -> None:
    _refused(worker_main, monkeypatch, capsys, env, argv, message)


def test_help_imports_neither_torch_nor_grpc_and_lists_the_exit_statuses() -> None:
    """Every command's parser is built without torch or gRPC (they load when a command runs),
    so ``rabo --help`` is quick; the help ends with the exit statuses."""
    import subprocess
    import sys

    code = ("import sys, io, contextlib\n"
            "from rabo.cli import build_parser\n"
            "p = build_parser()\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            "        p.parse_args(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc'))\n"
            "print(heavy)\n"
            "print(out.getvalue())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    first, _, help_text = proc.stdout.partition("\n")
    assert first == "[]", first
    from rabo.errors import ExitCode

    assert "exit status:" in help_text
    for status in ExitCode:
        assert f"  {int(status)}  " in help_text
    for command in ("simulate", "dist", "coordinator", "worker", "local", "bench", "experiment"):
        assert command in help_text


def test_a_budget_too_small_for_every_client_is_an_error_not_a_traceback(capsys) -> None:
    rc, err = _run(rabo_main, ["simulate", "--set", "data.dataset=digits", "--set", "rounds=1",
                               "--set", "clients.memory_budgets=['1KiB']"], capsys)
    assert rc == 2
    assert "no client fits the smallest ratio" in err and "clients.memory_budgets" in err
    assert "needs ~" in err  # the policy's reason for client 0


def test_a_reader_that_goes_away_gets_no_traceback() -> None:
    """``rabo config | head``: the pipe closes before rabo is done writing."""
    proc = subprocess.Popen([sys.executable, "-m", "rabo.cli", "config", "--markdown"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_certs_refuse_to_replace_a_ca_without_force(tmp_path) -> None:
    out = tmp_path / "pki"
    run = [sys.executable, "-m", "rabo.cli", "certs", "--out", str(out), "--workers", "1"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    ca = (out / "ca.crt").read_bytes()
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "already holds a CA" in again.stderr and "--force" in again.stderr
    assert (out / "ca.crt").read_bytes() == ca  # untouched
    forced = subprocess.run([*run, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert (out / "ca.crt").read_bytes() != ca


def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path, monkeypatch) -> None:
    from rabo.data.sources import resolve_root
    from rabo.errors import DataError

    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv("RABO_DATA_DIR", str(missing))
    for dataset in ("mnist", "fashion-mnist"):
        with pytest.raises(DataError, match=r"RABO_DATA_DIR=.*no-such-dir is not a directory "
                                            r"\(it does not exist\)"):
            resolve_root(dataset, None)
    assert resolve_root("digits", None) == Path(".")  # reads no files: not consulted


def test_a_coordinator_without_out_names_its_run_folder_and_says_what_happened(tmp_path) -> None:
    """No --out: a new folder under runs/ is made and printed, so that the checkpoint a
    signal writes lands somewhere the user is told of; stopped while waiting for workers, the
    log says so instead of announcing rounds."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "rabo.cli", "coordinator", "--bind",
                             "127.0.0.1:0", "--set", "data.dataset=digits", "--set",
                             "clients.count=2"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, GRPC_VERBOSITY="NONE"))
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "waiting for 2 workers" in line or not line:
            break
    assert any("waiting for 2 workers" in ln for ln in lines), lines
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 0, err
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("coordinator-")
    rel = f"runs/{folder.name}"
    assert f"no --out given; the run folder is {rel}" in text
    assert f"checkpointed in {rel} (resume with --resume {rel})" in text
    assert "stopped while waiting for workers: 0 of 2 registered, no round run" in err
    assert "starting" not in err


def test_the_used_folder_refusal_offers_only_what_the_command_can_do(tmp_path) -> None:
    from rabo import checkpoint

    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"round": 1}\n')
    simulate = subprocess.run([sys.executable, "-m", "rabo.cli", "simulate", "--out", str(used),
                               "--set", "data.dataset=digits", "--rounds", "1"],
                              capture_output=True, text=True, timeout=120)
    assert simulate.returncode == 2
    assert "holds a run" in simulate.stderr and "--overwrite" in simulate.stderr
    assert "--resume" not in simulate.stderr  # rabo simulate cannot resume
    with pytest.raises(checkpoint.CheckpointError, match=r"continue it with `rabo coordinator "
                                                         r"--resume .*used` and workers"):
        checkpoint.claim_run_dir(used, resume="`rabo coordinator --resume {dir}` and workers")


def test_rabo_local_with_fewer_workers_than_clients_says_what_goes_untrained(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "local", "--workers", "1", "--out",
                           str(tmp_path / "run"), "--set", "data.dataset=digits", "--set",
                           "clients.count=3", "--set", "model.hidden=[16]", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("--workers 1 < clients.count 3: the data partitions of clients 1, 2 get no worker "
            "and go untrained (start 3 workers, or set clients.count=1)") in proc.stderr


def test_quiet_and_verbose_go_after_the_subcommand_too() -> None:
    from rabo.cli import build_parser

    p = build_parser()
    assert p.parse_args(["simulate", "-v"]).verbose and not p.parse_args(["simulate"]).verbose
    assert p.parse_args(["-v", "simulate"]).verbose  # before it, as always
    assert p.parse_args(["bench", "transport", "-q"]).quiet  # nested subcommands too
    run = [sys.executable, "-m", "rabo.cli", "simulate", "--rounds", "3", "--set",
           "data.dataset=digits", "--set", "model.hidden=[16]"]
    loud = subprocess.run(run, capture_output=True, text=True, timeout=120)
    calm = subprocess.run([*run, "-q"], capture_output=True, text=True, timeout=120)
    assert loud.returncode == calm.returncode == 0, calm.stderr
    assert sum(ln.startswith("round ") for ln in loud.stdout.splitlines()) == 3
    assert not [ln for ln in calm.stdout.splitlines() if ln.startswith("round ")]
    assert "done: test_acc" in calm.stdout
    both = subprocess.run([*run, "-q", "-v"], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "-v and -q exclude each other" in both.stderr


def test_report_compares_runs_and_exports_csv(tmp_path) -> None:
    import csv
    import json

    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        proc = subprocess.run([sys.executable, "-m", "rabo.cli", "simulate", "-q", "--rounds", "3",
                               "--out", str(out), "--set", "data.dataset=digits", "--set",
                               "model.hidden=[16]", "--set", f"seed={seed}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs.append(out)
    plots, table = tmp_path / "cmp", tmp_path / "m.csv"
    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "report", *map(str, runs), "--out",
                           str(plots), "--csv", str(table)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for run in runs:  # the table's final accuracy is the run's, in percent
        acc = json.loads((run / "summary.json").read_text())["test_acc"]
        (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith(run.name + " ")]
        assert f"{100 * acc:.2f}%" in line.split()
    for name in ("compare.png", "compare.pdf", "compare_per_width.png", "compare_per_width.pdf"):
        assert (plots / name).stat().st_size > 1000
    assert (plots / "compare.pdf").read_bytes()[:5] == b"%PDF-"
    from matplotlib import image

    assert image.imread(plots / "compare.png").shape[0] > 100
    rows = list(csv.DictReader(table.open()))
    assert [(r["run"], int(r["round"])) for r in rows] == [
        (run.name, q) for run in runs for q in (1, 2, 3)]
    metrics = [json.loads(ln) for ln in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert float(rows[2]["test_acc"]) == metrics[2]["test_acc"]
    assert int(rows[2]["cumulative_bytes"]) == sum(m["payload_bytes"] for m in metrics)
    missing = subprocess.run([sys.executable, "-m", "rabo.cli", "report", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "has no metrics.jsonl" in missing.stderr


def test_every_option_of_every_command_shows_its_default() -> None:
    import argparse

    from rabo.cli import build_parser

    parsers, stack = [], [build_parser()]
    while stack:
        p = stack.pop()
        parsers.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack.extend(a.choices.values())
    assert len(parsers) > 15  # simulate, local, coordinator, worker, benches, experiments ...
    missing = []
    for p in parsers:
        text = " ".join(p.format_help().split())
        for a in p._actions:
            d = a.default
            if (a.option_strings and a.help != argparse.SUPPRESS  # hidden: internal options
                    and d not in (None, argparse.SUPPRESS, "", [])
                    and d is not False and "default" not in (a.help or "").lower()
                    and f"(default: {d})" not in text):
                missing.append(f"{p.prog} {a.option_strings[0]}")
    assert not missing, missing
    worker = next(p for p in parsers if p.prog.endswith(" worker"))
    assert "long-poll length (default: 5.0)" in " ".join(worker.format_help().split())
