"""pyproject.toml: the project installs as a package (requirements.txt is `pip install -e .`), its console
scripts are the front ends' own main()s, and every front end and package is in the distribution."""
import importlib
import importlib.metadata
import os
import subprocess
import tomllib

from conftest import ROOT

PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
SCRIPTS = PYPROJECT["project"]["scripts"]


def test_every_console_script_names_a_main_function():
    for name, target in SCRIPTS.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_the_installed_distribution_declares_the_console_scripts():
    installed = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="console_scripts")
                 if entry.name.startswith("cogvlm-")}
    assert installed == SCRIPTS, "re-run `pip install -e .` (requirements.txt) after editing pyproject.toml"


def test_a_console_script_runs_outside_the_checkout(tmp_path):
    """The installed command finds the toolkit from any working directory (no sys.path edits in the code)."""
    proc = subprocess.run(["cogvlm-cli", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--from_pretrained" in proc.stdout


def test_every_front_end_and_package_is_in_the_distribution():
    setuptools = PYPROJECT["tool"]["setuptools"]
    front_ends = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    assert set(setuptools["py-modules"]) == front_ends
    patterns = setuptools["packages"]["find"]["include"]
    packages = [name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py"))]
    assert sorted(packages) == sorted(pattern.rstrip("*") for pattern in patterns)
