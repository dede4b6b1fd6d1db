"""The project's structure, read from its imports with `ast`: dependencies point one way.

    entry scripts (cli_demo.py, web_demo.py, finetune_demo.py, evaluate_demo.py, merge_model.py, openai_demo/,
    scripts/)  ->  utils/ (inference layer, finetuning data)  ->  models/checkpoint/  ->  models/ (networks, config)
    ->  models/kernels/ (CPU features, C kernels, replacement linears, attention)

models/errors.py, which imports nothing, is below them all. Checked: models/ never imports utils/ or an entry
script; the networks never import the checkpoint layer (models/__init__.py, the package's face, may: it
installs `from_pretrained`); the kernels import nothing of the project but each other and models.errors;
utils/ never imports an entry script; no cycle between project modules; no library module (models/, utils/)
imports a project module inside a function (a cycle dodged): entry scripts do, after parsing their flags, so
that `--help` loads no SAT (checked too); no project source file over 400 lines; no module-level state that
changes at run time outside ALLOWLIST. tests/ and bench/ are outside the layers (they may import anything).
"""
import ast
import os
import re
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
    if module == "models.errors":
        return "errors"
    if module == "models.kernels" or module.startswith("models.kernels."):
        return "kernels"
    if module.startswith("models."):
        return "models"
    if module == "utils" or module.startswith("utils."):
        return "utils"
    return "entry"


ALLOWED = {"errors": set(), "kernels": {"kernels", "errors"}, "models": {"models", "kernels", "errors"},
           "checkpoint": {"models", "kernels", "checkpoint", "errors"},
           "models-package": {"models", "kernels", "checkpoint", "errors"},
           "utils": {"utils", "checkpoint", "models", "kernels", "models-package", "errors"}}


def test_the_graph_sees_the_project():
    assert {"models.cogvlm_model", "models.checkpoint.loader", "utils.pipeline", "cli_demo",
            "openai_demo.openai_api"} <= set(MODULES)
    assert "models.checkpoint.loader" in GRAPH["utils.pipeline"] or "models.checkpoint" in GRAPH["utils.pipeline"]
    assert "models.cogvlm_model" in GRAPH["models.checkpoint.loader"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) != "entry"))
def test_dependencies_point_down(module):
    upward = [target for target in GRAPH[module] if layer(target) not in ALLOWED[layer(module)]]
    assert not upward, f"{module} ({layer(module)}) imports {upward}"


KERNEL_MODULES = {"models.kernels", "models.kernels.cpu", "models.kernels.native", "models.kernels.linear",
                  "models.kernels.packed", "models.kernels.quantization", "models.kernels.attention"}


def test_the_kernels_sit_below_the_networks():
    """models/kernels/ holds the kernel modules, under no other name, and imports nothing of the project above it
    (networks, checkpoint layer, utils/, entry scripts); the networks and the checkpoint layer use it."""
    kernels = {module for module in MODULES if layer(module) == "kernels"}
    assert kernels == KERNEL_MODULES
    assert not {"models.cpu", "models.native", "models.linear", "models.packed", "models.quantization",
                "models.attention"} & set(MODULES)
    assert os.path.isfile(os.path.join(ROOT, "models", "kernels", "csrc", "cpu_kernels.c"))  # native.SOURCE
    above = {module: sorted(GRAPH[module] - KERNEL_MODULES - {"models.errors"}) for module in sorted(kernels)}
    assert not any(above.values()), {module: targets for module, targets in above.items() if targets}
    assert "models.kernels.linear" in GRAPH["models.cogvlm_model"]
    assert "models.kernels.quantization" in GRAPH["models.checkpoint.loader"]


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


def test_one_way_to_import_the_project():
    """No file edits sys.path (`pip install -e .` from requirements.txt, and pytest's pythonpath, give the
    packages), and bench/'s modules import each other as `bench.<name>` only, not by the bare name that
    `python bench/<name>.py`'s own folder on sys.path would also allow."""
    bench = os.path.join(ROOT, "bench")
    bench_names = {name[:-3] for name in os.listdir(bench) if name.endswith(".py")} - {"__init__"}
    files = list(MODULES.values()) + [os.path.join(folder, name) for folder in (bench, os.path.join(ROOT, "tests"))
                                      for name in os.listdir(folder) if name.endswith(".py")]
    found = []
    for path in files:
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            where = f"{os.path.relpath(path, ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and ast.unparse(node) in ("sys.path.insert", "sys.path.append"):
                found.append(f"{where} edits sys.path")
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found.extend(f"{where} imports {name}" for name in names if name.split(".")[0] in bench_names)
    assert not found, found


def test_front_ends_run_turns_through_the_chat_turn():
    """A front end hands a utils.chat.ChatStream to the engine (`turn.submit()`, iteration), never a turn's
    unpacked `inputs` with its tokens fed back by hand: only utils/chat.py submits a processor output."""
    found = []
    bench = os.path.join(ROOT, "bench")
    paths = [path for module, path in MODULES.items() if module != "utils.chat"]
    for path in paths + [os.path.join(bench, name) for name in os.listdir(bench) if name.endswith(".py")]:
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("submit", "submit_many") and node.args
                    and ".inputs" in ast.unparse(node.args[0])):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert not found, found


def test_the_test_catches_what_it_forbids(tmp_path):
    """The checker itself: an upward and a function-level import in a scratch file are found."""
    scratch = tmp_path / "scratch.py"
    scratch.write_text("from utils.pipeline import load_pipeline\n\ndef f():\n    import models.config\n")
    found = imports_of(str(scratch))
    assert ("utils.pipeline", 1, False) in found and ("models.config", 4, True) in found


# Module-level state that changes at run time, each with why it stays a module global. Anything else holds its
# state in an object its user owns (a model's mixin, a cache passed in) or in an explicit context manager.
ALLOWLIST = {
    "models/kernels/quantization.py:_workspace": "threading.local scratch buffers: the int4 layers' dequantized "
        "weight, one buffer per thread reused by every layer it runs (a fresh prompt-sized tensor per call costs "
        "page faults); per thread, so no two threads share one",
    "models/checkpoint/convert.py:_llama_log": "the ctypes log callback handed to llama.cpp, which keeps the "
        "pointer for the process's life: it must outlive the call that sets it, once per process",
    "scripts/make_captcha_dataset.py:_FONT_CACHE": "loaded fonts by (path, size), filled once per key: a memo of "
        "read-only objects, as functools.lru_cache would keep",
}

# What makes a module-level name mutable state: bound to one of these (a tuple, frozenset, number or string is
# not), and either named in lower case (UPPER_CASE is a constant by convention) or changed inside a function.
MUTABLE_LITERALS = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
MUTABLE_CALLS = {"dict", "list", "set", "bytearray", "defaultdict", "OrderedDict", "Counter", "deque", "ChainMap",
                 "local", "WeakKeyDictionary", "WeakValueDictionary", "WeakSet"}
MUTATING_METHODS = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "clear",
                    "remove", "discard", "appendleft", "popleft"}


def _is_mutable(value: ast.expr) -> bool:
    if isinstance(value, MUTABLE_LITERALS):
        return True
    if isinstance(value, ast.Call):  # dict(), threading.local(), collections.deque(), ...
        name = ast.unparse(value.func)
        return name.rpartition(".")[2] in MUTABLE_CALLS or name.startswith(("collections.", "queue.", "weakref."))
    return False


def _import_time_statements(tree: ast.Module):
    """The statements a module runs when imported: its body, with that of its if / try / with / for blocks."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            pending.extend(child for field in ("body", "orelse", "finalbody", "handlers")
                           for child in getattr(node, field, []) if isinstance(child, (ast.stmt, ast.excepthandler)))


def _changed_name(node: ast.AST):
    """The plain name whose object `node` changes (`x[k] = v`, `x.a = v`, `del x[k]`, `x += y`, `x.append(v)`)."""
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for target in targets:
            if isinstance(target, (ast.Subscript, ast.Attribute)) and isinstance(target.value, ast.Name):
                return target.value.id
            if isinstance(node, ast.AugAssign) and isinstance(target, ast.Name):
                return target.id
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATING_METHODS
            and isinstance(node.func.value, ast.Name)):
        return node.func.value.id
    return None


def mutable_state_of(path: str) -> Dict[str, str]:
    """{name: what makes it state} for the file's module-level mutable state: every `global` statement, and
    every module-level name bound to a mutable object that is lower-case or changed inside a function."""
    tree = ast.parse(open(path).read(), path)
    mutable = {}
    for node in _import_time_statements(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
        mutable.update((target.id, node.lineno) for target in targets
                       if isinstance(target, ast.Name) and _is_mutable(node.value))
    found = {name: f"line {line}: module-level {name} is a mutable object" for name, line in mutable.items()
             if name != name.upper() and not re.fullmatch(r"__\w+__", name)}  # __all__ and kin are constants
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                for name in node.names if isinstance(node, ast.Global) else ():
                    found.setdefault(name, f"line {node.lineno}: `global {name}` in {function.name}()")
                if (name := _changed_name(node)) in mutable:
                    found.setdefault(name, f"line {node.lineno}: module-level {name} changed in {function.name}()")
    return found


def test_no_module_level_state_outside_the_allowlist():
    found = {f"{os.path.relpath(path, ROOT)}:{name}": why for path in MODULES.values()
             for name, why in mutable_state_of(path).items()}
    assert not set(found) - set(ALLOWLIST), {key: found[key] for key in set(found) - set(ALLOWLIST)}
    assert not set(ALLOWLIST) - set(found), f"stale ALLOWLIST entries: {sorted(set(ALLOWLIST) - set(found))}"


def test_the_state_check_catches_what_it_forbids(tmp_path):
    """The checker itself, on a scratch file: caches, registries and `global` are found; constants are not."""
    scratch = tmp_path / "scratch.py"
    scratch.write_text(
        "import collections, threading\n"
        "LIMITS = {'rows': 4}\nNAMES = ('a', 'b')\n_KINDS = frozenset({'all'})\n__all__ = ['f']\n"
        "_cache = {}\n_local = threading.local()\nREGISTRY = []\n_seen = collections.OrderedDict()\n"
        "_last = (None, 0)\ncount = 0\nif True:\n    _late = set()\n"
        "def f(x):\n    global _last\n    _last = (x, 1)\n    REGISTRY.append(x)\n    return LIMITS['rows']\n"
        "def g():\n    count = []\n    count.append(1)\n")
    found = mutable_state_of(str(scratch))
    assert set(found) == {"_cache", "_local", "REGISTRY", "_seen", "_last", "_late"}, found
    assert "global _last" in found["_last"] and "changed in f()" in found["REGISTRY"]
