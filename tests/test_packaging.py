"""The optional parts of the install (pyproject.toml's extras): a worker needs none of them.

Each test runs the real entry point in a child interpreter where the extras' packages are
blocked (``sys.modules[name] = None`` makes every import of them fail, as if they were not
installed): the commands that only plot on the side carry on, those that need a missing
package stop before doing any work and name the extra to install. The Dockerfile's
requirement list is checked for both of its builds (the default and ``EXTRAS=``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
# the import names of what the extras install (plots, certs, metrics, tracking, mnist1d)
EXTRA_MODULES = ("matplotlib", "cryptography", "prometheus_client", "tensorboard", "mnist1d")
EXTRA_PACKAGES = ("matplotlib", "cryptography", "prometheus-client", "tensorboard", "mnist1d")
HINTS = {"matplotlib": "pip install 'rabo[plots]'", "cryptography": "pip install 'rabo[certs]'",
         "prometheus_client": "pip install 'rabo[metrics]'"}
TINY = ["--set", "data.dataset=digits", "--set", "clients.count=2", "--set", "model.hidden=[16]"]


def _block(modules: tuple[str, ...]) -> str:
    return f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"


def rabo(argv: list[str], blocked: tuple[str, ...] = EXTRA_MODULES, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``rabo ARGV`` in a child interpreter without the ``blocked`` packages."""
    code = _block(blocked) + f"from rabo.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


@cache
def _project() -> dict[str, Any]:
    import tomllib  # Python >= 3.11, as in tests/test_deploy.py

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _expand(extra: str) -> list[str]:
    """An extra's requirements with its references to other extras of rabo resolved."""
    out = []
    for req in _project()["optional-dependencies"][extra]:
        if _name(req) == _project()["name"]:
            inner = req.partition("[")[2].partition("]")[0]
            out += [r for e in inner.split(",") for r in _expand(e.strip())]
        else:
            out.append(req)
    return out


# --------------------------------------------------------------------------- pyproject


def test_the_extras_hold_what_only_some_roles_need_and_dev_holds_them_all() -> None:
    core = {_name(r) for r in _project()["dependencies"]}
    assert not core & set(EXTRA_PACKAGES), core & set(EXTRA_PACKAGES)
    assert _expand("plots") == ["matplotlib>=3.7"]
    assert [_name(r) for r in _expand("certs")] == ["cryptography"]
    assert [_name(r) for r in _expand("metrics")] == ["prometheus-client"]
    assert [_name(r) for r in _expand("tracking")] == ["tensorboard"]
    assert [_name(r) for r in _expand("mnist1d")] == ["mnist1d"]
    every = _expand("all")
    assert sorted(map(_name, every)) == sorted(EXTRA_PACKAGES)
    # dev spells them out (the constraints test reads dev, not rabo[...]): the same specifiers
    assert set(every) <= set(_expand("dev")), set(every) - set(_expand("dev"))


# --------------------------------------------------------------------------- without the extras


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A `rabo simulate` run made without any extra installed: (run folder, its stdout)."""
    out = tmp_path_factory.mktemp("bare") / "run"
    proc = rabo(["simulate", "-q", "--rounds", "2", "--out", str(out), *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_simulate_runs_without_any_extra(bare_run: tuple[Path, str]) -> None:
    out, stdout = bare_run
    assert "done: test_acc" in stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert (out / "summary.json").is_file()


def test_local_runs_a_round_without_any_extra_and_says_its_plots_were_skipped(
        tmp_path: Path) -> None:
    """The coordinator (no metrics port) and its worker processes, all without the extras:
    a sitecustomize on PYTHONPATH blocks them in every interpreter of the job."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_block(EXTRA_MODULES))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "local", "-q", "--workers", "1",
                           "--out", str(out), "--rounds", "1", "--set", "data.dataset=digits",
                           "--set", "clients.count=1", "--set", "model.hidden=[16]"],
                          capture_output=True, text=True, timeout=180, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert ("plots skipped: matplotlib is not installed (pip install 'rabo[plots]')"
            in proc.stdout.splitlines()), proc.stdout
    assert (out / "metrics.jsonl").is_file() and not list(out.glob("*.png"))


def test_report_needs_matplotlib_and_says_so(bare_run: tuple[Path, str],
                                             tmp_path: Path) -> None:
    out, _ = bare_run
    for argv in (["report", str(out)], ["report", str(out), str(out), "--out", str(tmp_path)]):
        proc = rabo(argv, blocked=("matplotlib",))
        assert proc.returncode == 2, proc.stderr
        assert "rabo report: error: matplotlib is not installed (pip install 'rabo[plots]')" \
            in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not list(out.glob("*.png")) and not list(tmp_path.iterdir())


def test_experiments_need_matplotlib_and_stop_before_running(tmp_path: Path) -> None:
    results = tmp_path / "results"
    for argv in (["experiment", "claims", "--quick", "--no-store", "--out", str(results)],
                 ["experiment", "report", "--out", str(results)]):
        proc = rabo(argv, blocked=("matplotlib",))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert HINTS["matplotlib"] in proc.stderr and "Traceback" not in proc.stderr
    assert not results.exists()


def test_mnist1d_data_needs_its_extra_and_says_so(tmp_path: Path) -> None:
    proc = rabo(["simulate", "-q", "--rounds", "1", "--out", str(tmp_path / "run"),
                 *TINY, "--set", "data.dataset=mnist1d"])
    assert proc.returncode != 0
    assert "pip install 'rabo[mnist1d]'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_certs_need_cryptography_and_say_so(tmp_path: Path) -> None:
    proc = rabo(["certs", "--out", str(tmp_path / "certs")], blocked=("cryptography",))
    assert proc.returncode == 2, proc.stderr
    assert "rabo certs: error: the cryptography package is not installed " \
           "(pip install 'rabo[certs]')" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "certs").exists()


def test_a_metrics_port_needs_prometheus_client_and_says_so(tmp_path: Path) -> None:
    # the flag (or RABO_METRICS_PORT): refused as it is parsed, before anything starts
    proc = rabo(["coordinator", "--metrics-port", "9", "--out", str(tmp_path / "a"), *TINY],
                blocked=("prometheus_client",))
    assert proc.returncode == 2, proc.stderr
    assert "argument --metrics-port: the prometheus-client package is not installed " \
           "(pip install 'rabo[metrics]')" in proc.stderr
    assert not (tmp_path / "a").exists()
    # the config key: refused as the coordinator starts, before it listens
    proc = rabo(["coordinator", "--bind", "127.0.0.1:0", "--out", str(tmp_path / "b"),
                 "--set", "cluster.metrics_port=9", *TINY], blocked=("prometheus_client",),
                timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cluster.metrics_port 9: the prometheus-client package is not installed " \
           "(pip install 'rabo[metrics]')" in proc.stderr
    assert "Traceback" not in proc.stderr and "listening" not in proc.stdout


def test_the_worker_entry_points_load_no_extra() -> None:
    code = ("import contextlib, io, json, sys\n"
            "import worker.cli, worker.client\n"
            "from rabo.cli import main\n"
            "for run in (lambda: worker.cli.main(['--help']), lambda: main(['worker', '--help'])):"
            "\n    with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.suppress(SystemExit):\n        run()\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & "
            f"{set(EXTRA_MODULES)!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


# --------------------------------------------------------------------------- the image


def _dockerfile_runs() -> list[str]:
    """The Dockerfile's RUN scripts, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def _default_extras() -> str:
    (default,) = re.findall(r"^ARG EXTRAS=(.*)$", DOCKERFILE.read_text(), flags=re.M)
    return default


def _requirements(extras: str, tmp_path: Path) -> list[str]:
    """What the Dockerfile's tomllib step writes for ``EXTRAS=extras``, run by sh against
    the repository's pyproject.toml."""
    (script,) = [run for run in _dockerfile_runs() if "tomllib" in run]
    assert script.startswith("python -c ")
    # the Dockerfile's /tmp/ paths go to tmp_path; the interpreter's own path (a checkout
    # under /tmp, as CI's) stays as it is
    script = shlex.quote(sys.executable) + script[len("python"):].replace(
        "/tmp/", f"{tmp_path}/").replace("&& pip install", "&& echo")
    proc = subprocess.run(["sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "EXTRAS": extras}, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "requirements.txt").read_text().splitlines()


def test_the_image_installs_the_extras_chosen_by_its_build_arg(tmp_path: Path) -> None:
    core = _project()["dependencies"]
    worker = _requirements("", tmp_path)
    assert worker == core
    assert not {_name(r) for r in worker} & set(EXTRA_PACKAGES)
    assert _default_extras() == "all"
    everything = _requirements(_default_extras(), tmp_path)
    assert everything == core + _expand("all")
    assert _requirements("certs, plots", tmp_path) == core + _expand("certs") + _expand("plots")
    # the project itself, with the same extras: `.` alone for the worker image
    (install,) = [run for run in _dockerfile_runs() if re.search(r"pip install \S+ \S+ \.", run)]
    word = re.search(r"pip install -c constraints\.txt (\S+)", install).group(1)
    for extras, expected in (("", "."), ("all", ".[all]"), ("plots,certs", ".[plots,certs]")):
        proc = subprocess.run(["sh", "-c", f"printf %s {word}"], capture_output=True, text=True,
                              env={"EXTRAS": extras, "PATH": os.environ["PATH"]}, check=True)
        assert proc.stdout == expected, (extras, proc.stdout)
