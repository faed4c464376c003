"""The built wheel works on its own, away from the source checkout.

A wheel is built from a copy of the package's sources (so that no build
folder is left in the checkout, nor reused from it) and installed into a
new virtual environment outside the checkout. That environment sees this
one's packages through a path file (which runs none of their own path
files, so the editable install of the checkout stays out), which keeps the
test to seconds instead of installing torch again. The default training
then runs there.
"""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(command: list, cwd: Path) -> str:
    env = {key: value for key, value in os.environ.items()
           if key != "PYTHONPATH"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _fresh_venv(folder: Path) -> Path:
    """A new environment in folder whose own site-packages comes first and
    this interpreter's follow; its python executable."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(folder)],
         folder.parent)
    python = folder / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print("
                    "sysconfig.get_paths()['purelib'])"], folder).strip()
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (Path(purelib) / "outer.pth").write_text("\n".join(dict.fromkeys(ours)))
    return python


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(ROOT / "coom", source / "coom",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
          "--no-build-isolation", "--wheel-dir", str(wheels), str(source)],
         tmp_path)
    (wheel,) = wheels.glob("coom-*.whl")
    return wheel


def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "coom/recipes/tiny.yaml" in names
    # The language codes that data.languages is checked against.
    assert "coom/data/iso639.tsv" in names
    assert not any(name.startswith(("tests/", "benchmarks/"))
                   for name in names)

    python = _fresh_venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install",
          "--quiet", "--no-deps", "--no-index", str(wheel)], tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(python), "-c", "import coom; print(coom.__file__)"],
                 work)
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")

    out = _run([str(python.parent / "coom"), "train", "tiny", "--set",
                "train.steps=2"], work)
    assert "finished 2 steps" in out
    assert len(list((work / "runs").glob("tiny-*/checkpoints/step_*"))) == 1
