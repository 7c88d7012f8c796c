"""Where a run's numbers come from: the rabo version, the git commit of the checkout it ran
from (and whether tracked files had local changes), torch's version and build, the device,
the host and the command line. Every ``summary.json`` carries it (``rabo.records.summarize``),
and ``rabo --version`` prints it.

Read once per process, at the first call: ``simulate``, the coordinator's ``serve``, ``rabo
dist`` and ``rabo experiment`` call it as they start, so that edits to the checkout while a
run goes on do not change what it reports.
"""

from __future__ import annotations

import functools
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def git_state(path: Path = PACKAGE_DIR) -> dict[str, Any]:
    """The commit of the git checkout holding ``path`` and the tracked files it has changed,
    or ``None`` for both where ``path`` is not in a checkout (an installed package) or git is
    missing."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return {"git_commit": None, "git_modified_files": None}
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_modified_files": None}
    return {"git_commit": head.stdout.strip() or None,
            "git_modified_files": sorted(line[3:] for line in dirty.stdout.splitlines())}


def torch_build() -> dict[str, Any]:
    import torch

    cuda = getattr(torch.version, "cuda", None)
    # the device name only where CUDA is already initialised: asking for it would create a
    # CUDA context on GPU 0 in a process (a coordinator, a grid's parent) that needs none
    named = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"torch_version": torch.__version__, "torch_cuda_build": cuda,
            "cuda_available": bool(torch.cuda.is_available()),
            "cuda_device": torch.cuda.get_device_name(0) if named else None}


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """This process's provenance (see the module docstring); the same dict on every call."""
    from rabo import __version__

    return {"rabo_version": __version__, **git_state(), **torch_build(),
            "host": socket.gethostname(), "python": platform.python_version(),
            "platform": platform.platform(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""}


def version_text() -> str:
    """What ``rabo --version`` prints."""
    p = provenance()
    commit = p["git_commit"]
    where = ("installed package" if commit is None else
             f"git {commit[:12]}" + (f", {len(p['git_modified_files'])} modified file(s)"
                                     if p["git_modified_files"] else ""))
    cuda = (f"CUDA {p['torch_cuda_build']}" if p["torch_cuda_build"] else "CPU build")
    return (f"rabo {p['rabo_version']} ({where}); torch {p['torch_version']} ({cuda}"
            + (f", {p['cuda_device']}" if p["cuda_device"] else "") + f"); Python {p['python']}")
