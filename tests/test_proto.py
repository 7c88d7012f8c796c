"""The committed wire modules are what `make proto` generates from proto/."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["rabo_pb2.py", "rabo_pb2_grpc.py", "rabo_pb2.pyi"]


def test_generated_modules_are_current(tmp_path: Path) -> None:
    src = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", src)
    code = protoc.main(["protoc", f"-I{src}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
                        str(src / "rabo_proto" / "v1" / "rabo.proto")])
    assert code == 0
    for name in GENERATED:
        fresh = (tmp_path / "rabo_proto" / "v1" / name).read_text()
        committed = (ROOT / "rabo_proto" / "v1" / name).read_text()
        assert fresh == committed, f"rabo_proto/v1/{name} is stale: run `make proto`"


def test_package_is_versioned() -> None:
    text = (ROOT / "proto" / "rabo_proto" / "v1" / "rabo.proto").read_text()
    assert "package rabo.v1;" in text
