"""What the GPU check needs beyond torch, transformers and safetensors, unpacked from carried wheels.

A GPU machine may have no DeepSpeed, Hydra or OmegaConf and no network. tests/gpu/fetch_wheels.sh fetches
their wheels elsewhere into tests/gpu/wheels/; this unpacks, into a folder that run.sh puts first on
PYTHONPATH, the ones this Python lacks: a wheel is a zip laid out as site-packages, so no pip, venv or
network is needed. A group is installed whole when any member is missing (pydantic with its compiled core,
Hydra with its OmegaConf and ANTLR), so that versions always match.

MPI: where no ``mpiexec`` is found (on PATH or beside this Python), the MPICH wheel's programs and libraries
(its ``*.data/data`` part) go to ``TARGET/mpi`` (run.sh puts its ``bin`` on PATH and names its ``libmpi`` to
mpi4py through ``MPI4PY_LIBMPI``), with mpi4py 4's wheel where this Python's mpi4py is older (mpi4py 4 loads
an MPI library named at run time). The target is emptied first at every run, so it holds only what this
Python lacks.

    python tests/gpu/deps.py --wheels tests/gpu/wheels --target tests/gpu/.deps [--force NAME ...]
"""
from __future__ import annotations

import argparse
import re
import shutil
import stat
import sys
import zipfile
from importlib import metadata
from pathlib import Path

# distribution groups, each installed whole; a member is "missing" when absent or older than its minimum
GROUPS = {
    "deepspeed": {"deepspeed": None, "hjson": None, "py-cpuinfo": None, "msgpack": None, "ninja": None,
                  "psutil": None, "einops": None},
    "pydantic": {"pydantic": (2, 0), "pydantic-core": None, "annotated-types": None, "typing-inspection": None},
    "hydra": {"hydra-core": (1, 3), "omegaconf": (2, 2), "antlr4-python3-runtime": None},
}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def missing(distribution: str, minimum, forced: set[str]) -> bool:
    if _normal(distribution) in forced:
        return True
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return True
    return minimum is not None and _version_tuple(version) < minimum


def has_mpi_launcher() -> bool:
    return shutil.which("mpiexec") is not None or (Path(sys.executable).parent / "mpiexec").exists()


def unpack_mpich(wheel: Path, target: Path) -> None:
    """The MPICH wheel's ``*.data/data`` (bin, lib, include) into ``target/mpi``, its programs executable."""
    prefix = target / "mpi"
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            parts = Path(member.filename).parts
            if len(parts) < 3 or not parts[0].endswith(".data") or parts[1] != "data" or member.is_dir():
                continue
            destination = prefix.joinpath(*parts[2:])
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink)
            mode = member.external_attr >> 16
            if parts[2] == "bin" or mode & stat.S_IXUSR:
                destination.chmod(destination.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def wheel_for(wheels: Path, distribution: str) -> Path:
    prefix = _normal(distribution) + "-"
    found = sorted(p for p in wheels.glob("*.whl") if _normal(p.name.split("-")[0]) + "-" == prefix)
    if not found:
        raise FileNotFoundError(f"no wheel of {distribution} in {wheels}: run tests/gpu/fetch_wheels.sh on a machine "
                                f"with the network and carry tests/gpu/wheels/ here")
    return found[-1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--force", nargs="*", default=[], help="install these groups even when present")
    args = parser.parse_args(argv)
    forced = {_normal(name) for group in args.force for name in GROUPS.get(group, {group: None})}
    wanted = [name for group in GROUPS.values() if any(missing(n, m, forced) for n, m in group.items())
              for name in group]
    mpich = not has_mpi_launcher() or "mpich" in forced
    if mpich and missing("mpi4py", (4, 0), forced):
        wanted.append("mpi4py")
    # Emptied every time: what another Python unpacked here (its compiled modules, its MPICH) must not reach
    # this one through run.sh's PYTHONPATH and PATH.
    shutil.rmtree(args.target, ignore_errors=True)
    if not wanted and not mpich:
        print("[gpu check] DeepSpeed, Hydra, an MPI launcher and their dependencies are installed", flush=True)
        return 0
    args.target.mkdir(parents=True, exist_ok=True)
    (args.target / ".gitignore").write_text("# unpacked by tests/gpu/deps.py\n*\n")
    try:
        wheels = [wheel_for(args.wheels, name) for name in wanted]
        mpich_wheel = wheel_for(args.wheels, "mpich") if mpich else None
    except FileNotFoundError as error:
        print(f"tests/gpu/run.sh: {error}", file=sys.stderr, flush=True)
        return 1
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(args.target)
    if mpich_wheel is not None:
        unpack_mpich(mpich_wheel, args.target)
        wheels.append(mpich_wheel)
    print(f"[gpu check] unpacked into {args.target}: {', '.join(p.name for p in wheels)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
