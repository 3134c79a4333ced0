#!/usr/bin/env python3
"""Regenerate the committed Python code for the wire protocol, or check that it is up to date.

    python scripts/gen_proto.py          # rewrite shared/wire/handoff_pb2*.py(i)
    python scripts/gen_proto.py --check  # exit 1 and name the files that drift

The generator is grpcio-tools (pinned in pyproject's test extra): protoc's output differs between
versions, so the drift check is only meaningful with the pinned one.
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "handoff/v1/handoff.proto"
OUT_DIR = ROOT / "shared" / "wire"
GENERATED = ("handoff_pb2.py", "handoff_pb2.pyi", "handoff_pb2_grpc.py")
# protoc writes absolute imports from the proto package path; ours live in shared.wire.
ABSOLUTE_IMPORT = "from handoff.v1 import handoff_pb2 as"
RELATIVE_IMPORT = "from . import handoff_pb2 as"
# The message classes' __module__ (what pickle imports them by, e.g. between Ray Serve's processes)
# must be the module they live in, not the proto package's path.
PROTO_MODULE = "'handoff.v1.handoff_pb2'"
PYTHON_MODULE = "'handoff.shared.wire.handoff_pb2'"


def generate() -> dict[str, bytes]:
    """Run protoc on the .proto and return the generated files by name."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
        out_dir = Path(tmp) / Path(PROTO_FILE).parent
        files = {name: (out_dir / name).read_bytes() for name in GENERATED}
    grpc_code = files["handoff_pb2_grpc.py"].decode()
    if ABSOLUTE_IMPORT not in grpc_code:
        raise SystemExit("generated gRPC code no longer imports its messages the expected way")
    files["handoff_pb2_grpc.py"] = grpc_code.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT).encode()
    msg_code = files["handoff_pb2.py"].decode()
    if PROTO_MODULE not in msg_code:
        raise SystemExit("generated message code no longer names its module the expected way")
    files["handoff_pb2.py"] = msg_code.replace(PROTO_MODULE, PYTHON_MODULE).encode()
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift, write nothing")
    args = parser.parse_args()
    files = generate()
    drifted = [
        name
        for name, data in files.items()
        if not (OUT_DIR / name).is_file() or (OUT_DIR / name).read_bytes() != data
    ]
    if args.check:
        if drifted:
            print(
                f"generated code drifts from {PROTO_FILE}: {', '.join(drifted)}; run python scripts/gen_proto.py"
            )
            return 1
        print("generated code is up to date")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = OUT_DIR / (name + ".tmp")
        tmp.write_bytes(data)
        shutil.move(tmp, OUT_DIR / name)
    print(
        f"wrote {', '.join(files)} into {OUT_DIR.relative_to(ROOT)}"
        + (f" ({len(drifted)} changed)" if drifted else " (unchanged)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
