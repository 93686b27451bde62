"""tests/gpu/deps.py, which unpacks the carried wheels on a GPU machine without network: MPICH's programs and
libraries (a wheel's ``*.data/data`` part) land in ``TARGET/mpi`` executable, where run.sh looks for them."""
from __future__ import annotations

import os
import sys
import zipfile

from helpers import REPO

sys.path.insert(0, str(REPO / "tests" / "gpu"))
import deps  # noqa: E402


def _mpich_wheel(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mpich-9.9.data/data/bin/mpiexec", "#!/bin/sh\necho launched\n")
        archive.writestr("mpich-9.9.data/data/bin/hydra_pmi_proxy", "proxy")
        archive.writestr("mpich-9.9.data/data/lib/libmpi.so.12", "library")
        archive.writestr("mpich-9.9.dist-info/METADATA", "Name: mpich\n")
    return path


def test_mpich_unpacks_into_the_prefix_run_sh_reads_its_programs_executable(tmp_path):
    deps.unpack_mpich(_mpich_wheel(tmp_path / "mpich-9.9-py3-none-any.whl"), tmp_path / "deps")
    prefix = tmp_path / "deps" / "mpi"
    assert (prefix / "lib" / "libmpi.so.12").read_text() == "library"
    assert os.access(prefix / "bin" / "mpiexec", os.X_OK) and os.access(prefix / "bin" / "hydra_pmi_proxy", os.X_OK)
    assert not os.access(prefix / "lib" / "libmpi.so.12", os.X_OK)
    assert not (tmp_path / "deps" / "mpich-9.9.dist-info").exists()


def test_forced_mpich_comes_from_the_wheels_folder_and_a_missing_one_is_named(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    target = tmp_path / "deps"
    assert deps.main(["--wheels", str(wheels), "--target", str(target), "--force", "mpich"]) == 1
    assert "no wheel of mpich" in capsys.readouterr().err
    _mpich_wheel(wheels / "mpich-9.9-py3-none-any.whl")
    assert deps.main(["--wheels", str(wheels), "--target", str(target), "--force", "mpich"]) == 0
    assert (target / "mpi" / "bin" / "mpiexec").exists()


def test_what_another_python_unpacked_is_gone_when_this_one_needs_nothing(tmp_path, monkeypatch, capsys):
    """run.sh puts the target first on PYTHONPATH and its MPICH on PATH: a Python that lacks nothing must not
    inherit another Python's compiled modules from an earlier run."""
    target = tmp_path / "deps"
    (target / "mpi" / "bin").mkdir(parents=True)
    (target / "mpi4py").mkdir()
    (target / "mpi4py" / "MPI.cpython-312-x86_64-linux-gnu.so").write_text("another Python's")
    monkeypatch.setattr(deps, "missing", lambda *args: False)
    monkeypatch.setattr(deps, "has_mpi_launcher", lambda: True)
    assert deps.main(["--wheels", str(tmp_path / "wheels"), "--target", str(target)]) == 0
    assert not target.exists()
    assert "are installed" in capsys.readouterr().out
