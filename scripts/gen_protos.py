"""Regenerates the Python stubs of sglmesh's protos into clients/python/src.

    python scripts/gen_protos.py          # write the stubs
    python scripts/gen_protos.py --check  # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "clients" / "python" / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on every proto under proto/ and returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for proto in protos:
        package_dir = out_dir / proto.parent.relative_to(PROTO_ROOT)
        for parent in [package_dir, *package_dir.relative_to(out_dir).parents]:
            init = out_dir / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        fresh = {p.relative_to(tmp_dir) for p in generate(tmp_dir)}
        committed = {
            p.relative_to(OUT_ROOT)
            for p in OUT_ROOT.rglob("*")
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        stale = sorted(
            str(rel)
            for rel in fresh | committed
            if rel not in fresh
            or rel not in committed
            or not filecmp.cmp(tmp_dir / rel, OUT_ROOT / rel, shallow=False)
        )
        if args.check:
            if stale:
                print("stale generated stubs (run `make proto`):", *stale, sep="\n  ")
                return 1
            print(f"generated stubs are up to date ({len(fresh)} files)")
            return 0
        for rel in committed - fresh:
            (OUT_ROOT / rel).unlink()
        for rel in fresh:
            target = OUT_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_dir / rel, target)
            init = target.parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        for parent in {(OUT_ROOT / rel).parent for rel in fresh}:
            for d in [parent, *parent.parents]:
                if d == OUT_ROOT or OUT_ROOT not in d.parents:
                    break
                (d / "__init__.py").touch(exist_ok=True)
        print(f"wrote {len(fresh)} files under {OUT_ROOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
