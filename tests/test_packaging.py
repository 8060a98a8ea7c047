"""The package installs as one top-level name: `pip install .` (a wheel, not editable) puts
`fusellm_kernels` into site-packages, the repository's training/ folder inside it as
`fusellm_kernels.training`, and nothing named `training` beside it; `fusellm train` and
`python -m fusellm_kernels.training.train` work from that install.

The wheel is built from a copy of the sources (so no build/ folder of the checkout leaks in)
and installed with --no-deps into a fresh virtual environment, which reuses this
environment's packages (torch, transformers, ...) through PYTHONPATH."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "fusellm_kernels", "training")


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh environment's python, the environment to run it with, its site-packages)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                  str(src)])
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("this environment has no pip")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp / "dist").glob("*.whl"))
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    target = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    got = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--target",
                str(target), str(wheel)])
    assert got.returncode == 0, got.stderr
    # this environment's packages, but not its site hooks (an editable install's finder)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    return python, env, target


def test_wheel_installs_no_top_level_training(installed: tuple[Path, dict[str, str], Path]) -> None:
    python, env, target = installed
    record = next(target.glob("fusellm_kernels-*.dist-info")) / "RECORD"
    tops = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines() if line}
    assert {t for t in tops if not t.endswith(".dist-info") and t not in ("..", "bin")} == {"fusellm_kernels"}, tops
    assert not {p.name for p in target.iterdir()} & {"training", "training.py"}
    assert (target / "fusellm_kernels" / "training" / "train.py").is_file()
    probe = _run([str(python), "-c", "import fusellm_kernels.training.train as t; print(t.__file__)"], env=env, cwd="/")
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == target / "fusellm_kernels" / "training" / "train.py"


def test_installed_commands_run(installed: tuple[Path, dict[str, str], Path]) -> None:
    python, env, _ = installed
    for cmd in ([str(python), "-m", "fusellm_kernels.cli", "train", "--help"],
                [str(python), "-m", "fusellm_kernels.training.train", "--help"]):
        r = _run(cmd, env=env, cwd="/")
        assert r.returncode == 0, r.stderr
        assert "--global-batch" in r.stdout and "--teacher-tail" in r.stdout


def test_a_checkout_without_install_finds_its_training_folder(tmp_path: Path) -> None:
    """PYTHONPATH=the repository, no install (bench/gpu_check.sh): fusellm_kernels.training is
    the checkout's own training/ folder, also when another copy is installed editable."""
    code = ("import sys, fusellm_kernels.training.train as t; print(t.__file__)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = _run([sys.executable, "-c", code], env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "training" / "train.py"
