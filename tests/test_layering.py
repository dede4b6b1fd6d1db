"""The project's structure, read from its imports with `ast`: dependencies point one way.

    entry scripts (cli_demo.py, web_demo.py, finetune_demo.py, evaluate_demo.py, merge_model.py, openai_demo/,
    scripts/)  ->  utils/ (inference layer, finetuning data)  ->  models/checkpoint/  ->  models/ (networks, config)

Checked: models/ never imports utils/ or an entry script; the networks never import the checkpoint layer
(models/__init__.py, the package's face, may: it installs `from_pretrained`); utils/ never imports an entry
script; no cycle between project modules; no library module (models/, utils/) imports a project module
inside a function (a cycle dodged): entry scripts do, after parsing their flags, so that `--help` loads no
SAT (checked too); no project source file over 400 lines. tests/ and bench/ are outside the layers (they may
import anything).
"""
import ast
import os
from typing import Dict, Set

import pytest

from conftest import ROOT

ENTRY_PACKAGES = ("openai_demo", "scripts")
LIBRARY_PACKAGES = ("models", "utils")
MAX_LINES = 400


def project_files() -> Dict[str, str]:
    """{dotted module name: path} of every project source file (tests, bench and golden data aside)."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for package in LIBRARY_PACKAGES + ENTRY_PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return modules


MODULES = project_files()


def resolve(name: str) -> str:
    """The project module an import names (`models.checkpoint.loader`, or the package `models`), or ''."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: str):
    """(imported project module, line, inside a function?) for every import in the file."""
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((resolve(alias.name), child.lineno, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:  # `from models import checkpoint` imports the submodule
                    submodule = f"{child.module}.{alias.name}"
                    found.append((submodule if submodule in MODULES else resolve(child.module), child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return [(target, line, inside) for target, line, inside in found if target]


GRAPH: Dict[str, Set[str]] = {module: set() for module in MODULES}
FUNCTION_LEVEL = []
for _module, _path in MODULES.items():
    for _target, _line, _inside in imports_of(_path):
        if _target != _module:
            GRAPH[_module].add(_target)
        if _inside and (_module.startswith(LIBRARY_PACKAGES) or _module in LIBRARY_PACKAGES):
            FUNCTION_LEVEL.append(f"{os.path.relpath(_path, ROOT)}:{_line} imports {_target}")


def layer(module: str) -> str:
    if module == "models" or module.startswith("models.checkpoint"):
        return "checkpoint" if module != "models" else "models-package"
    if module.startswith("models."):
        return "models"
    if module == "utils" or module.startswith("utils."):
        return "utils"
    return "entry"


ALLOWED = {"models": {"models"}, "checkpoint": {"models", "checkpoint"}, "models-package": {"models", "checkpoint"},
           "utils": {"utils", "checkpoint", "models", "models-package"}}


def test_the_graph_sees_the_project():
    assert {"models.cogvlm_model", "models.checkpoint.loader", "utils.pipeline", "cli_demo",
            "openai_demo.openai_api"} <= set(MODULES)
    assert "models.checkpoint.loader" in GRAPH["utils.pipeline"] or "models.checkpoint" in GRAPH["utils.pipeline"]
    assert "models.cogvlm_model" in GRAPH["models.checkpoint.loader"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) != "entry"))
def test_dependencies_point_down(module):
    upward = [target for target in GRAPH[module] if layer(target) not in ALLOWED[layer(module)]]
    assert not upward, f"{module} ({layer(module)}) imports {upward}"


# The front ends whose --help must not wait for SAT (finetune_demo.py's flags are SAT's own parser's).
LIGHT_HELP_SCRIPTS = ("cli_demo.py", "web_demo.py", "evaluate_demo.py", "merge_model.py", "openai_demo/openai_api.py",
                      "scripts/batch_infer.py", "scripts/convert_checkpoint.py")


def test_help_of_the_front_ends_imports_no_model_code():
    """Each script's --help, run in one process, leaves SAT, DeepSpeed and the networks unimported."""
    import subprocess
    import sys

    program = ("import runpy, sys\n"
               f"for script in {LIGHT_HELP_SCRIPTS!r}:\n"
               "    sys.argv = [script, '--help']\n"
               "    try:\n"
               "        runpy.run_path(script, run_name='__main__')\n"
               "    except SystemExit as e:\n"
               "        assert e.code == 0, (script, e.code)\n"
               "heavy = sorted(m for m in ('sat', 'deepspeed', 'models.cogvlm_model', 'ray') if m in sys.modules)\n"
               "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("usage:") == len(LIGHT_HELP_SCRIPTS)
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_no_function_level_imports_of_project_modules():
    assert not FUNCTION_LEVEL, FUNCTION_LEVEL


def test_no_import_cycles():
    state: Dict[str, int] = {}  # 1 on the current path, 2 done
    stack = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_no_source_file_over_the_limit():
    long = {os.path.relpath(path, ROOT): n for path in MODULES.values()
            if (n := len(open(path).read().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_test_catches_what_it_forbids(tmp_path):
    """The checker itself: an upward and a function-level import in a scratch file are found."""
    scratch = tmp_path / "scratch.py"
    scratch.write_text("from utils.pipeline import load_pipeline\n\ndef f():\n    import models.config\n")
    found = imports_of(str(scratch))
    assert ("utils.pipeline", 1, False) in found and ("models.config", 4, True) in found
