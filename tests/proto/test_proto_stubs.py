"""The checked-in Python stubs match proto/specserve/v1/*.proto.

Fails after an edit of a .proto until `proto/generate.sh` is run. The
descriptor comparison holds whatever grpcio-tools version is installed; the
byte-for-byte comparison runs only with the version that generated the stubs.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools")
from google.protobuf import descriptor_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted((PROTO_ROOT / "specserve" / "v1").glob("*.proto"))


def _import_stub(module: str):
    if str(PROTO_ROOT) not in sys.path:
        try:
            importlib.import_module("specserve")
        except ModuleNotFoundError:
            sys.path.insert(0, str(PROTO_ROOT))
    return importlib.import_module(module)


def _module_name(proto: Path, suffix: str) -> str:
    rel = proto.relative_to(PROTO_ROOT).with_suffix("")
    return ".".join(rel.parts) + suffix


def _clear_json_names(messages) -> None:
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_there_is_a_proto():
    assert [p.name for p in PROTOS] == ["generation.proto"]


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_checked_in_descriptor_matches_proto(proto: Path, tmp_path: Path):
    out = tmp_path / "set.pb"
    rel = proto.relative_to(PROTO_ROOT).as_posix()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
         f"--descriptor_set_out={out}", rel],
        check=True, cwd=PROTO_ROOT,
    )
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _clear_json_names(fresh.message_type)  # protoc fills these in; the embedded copy omits them
    module = _import_stub(_module_name(proto, "_pb2"))
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    assert checked_in == fresh, f"stubs of {rel} are stale: run proto/generate.sh"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_checked_in_grpc_stub_has_every_method(proto: Path):
    pb2 = _import_stub(_module_name(proto, "_pb2"))
    grpc_mod = _import_stub(_module_name(proto, "_pb2_grpc"))
    for service in pb2.DESCRIPTOR.services_by_name.values():
        servicer = getattr(grpc_mod, f"{service.name}Servicer")
        for method in service.methods:
            assert hasattr(servicer, method.name), (
                f"{service.name}.{method.name} missing from the stubs: run proto/generate.sh")


def test_checked_in_stubs_are_byte_identical(tmp_path: Path):
    stub = (PROTO_ROOT / "specserve" / "v1" / "generation_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub).group(1)
    from importlib.metadata import version

    # pyproject pins grpcio-tools to the version the stubs were made with.
    assert version("grpcio-tools") == made_with, (
        f"stubs were made with grpcio-tools {made_with}, {version('grpcio-tools')} is "
        "installed: install the pinned version, or bump the pin and run proto/generate.sh")
    subprocess.run(["bash", str(PROTO_ROOT / "generate.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "generate.sh wrote nothing"
    for rel in fresh:
        checked_in = PROTO_ROOT / rel
        assert checked_in.exists(), f"{rel} is not checked in: run proto/generate.sh"
        assert checked_in.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run proto/generate.sh")
