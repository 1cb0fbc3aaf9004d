"""The package (pyproject.toml): what `pip install .` gives a user, and its dependencies against requirements.txt."""

import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def requirement_lines(text: str) -> set[str]:
    return {re.sub(r"\s+", "", line.split("#")[0]) for line in text.splitlines() if line.split("#")[0].strip()}


def test_the_dependencies_and_extras_are_exactly_requirements_txt():
    """requirements.txt is the development environment; pyproject.toml splits it into what the scripts need and
    extras. Neither may gain or lose a requirement, or change a version bound, without the other."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    packaged = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    assert len(packaged) == len(set(packaged)), "a requirement listed twice in pyproject.toml"
    assert requirement_lines("\n".join(packaged)) == requirement_lines((ROOT / "requirements.txt").read_text())


@pytest.mark.slow  # a virtualenv, a build and three interpreters that import torch: about 20 s on 2 idle cores
def test_pip_install_gives_the_modules_and_the_commands_outside_the_clone(tmp_path):
    """`pip install .` into a fresh virtualenv; then, from a folder outside the clone and without PYTHONPATH, the two
    modules import from that virtualenv and the two commands print their usage."""
    # A copy of the clone, so the build's build/ and *.egg-info land there and not in the checkout.
    source = tmp_path / "clone"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "outputs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    # The fresh environment sees this one's site-packages (torch and the rest, pip, setuptools) through a .pth
    # file, after its own: installing torch again would take minutes and GBs. Build without isolation and without
    # dependencies, so nothing is downloaded; what is tested is the package's own files and entry points.
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "cached-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # venv.sh's: the clone
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                              str(source)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    imported = subprocess.run(
        [python, "-c", "import evaluate_kps, train_cat_lora\nfrom train_cat_lora import cat_loss, strip_trigger\n"
                       "print(train_cat_lora.__file__, evaluate_kps.__file__, strip_trigger('a sks dog', 'sks'))"],
        capture_output=True, text=True, env=env, cwd=outside)
    assert imported.returncode == 0, imported.stderr[-3000:]
    train_file, evaluate_file, stripped = imported.stdout.split(maxsplit=2)
    assert (train_file, evaluate_file) == (f"{purelib}/train_cat_lora.py", f"{purelib}/evaluate_kps.py")
    assert stripped.strip() == "a dog"

    for command, flag in (("train-cat-lora", "--pretrained_model_name_or_path"), ("evaluate-kps", "--output_dir")):
        done = subprocess.run([fresh / "bin" / command, "--help"], capture_output=True, text=True, env=env,
                              cwd=outside)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith("usage: ") and flag in done.stdout
