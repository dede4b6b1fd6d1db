"""One source per fact: the prompt templates (models.templates), the released checkpoints (models.releases),
the LoRA key markers (models.checkpoint.layout), the flags the scripts share (utils.cli) and the names of
lengths (models.config). Each test fails when a second copy of its fact appears in the code.

The scans read string constants with `ast` (docstrings aside: prose may name a checkpoint or quote a prompt).
"""
import argparse
import ast
import os
import re

import pytest
import torch

from conftest import ROOT
from models.checkpoint.layout import LORA_A, LORA_B, LORA_MARKERS, LORA_ORIGINAL
from models.config import CogVLMConfig
from models.hf_cogvlm import configuration_cogvlm
from models.releases import DEFAULT_CHECKPOINT, DEFAULT_FINETUNE_CHECKPOINT, RELEASED_CHECKPOINTS
from models.templates import DEFAULT_TEMPLATE, TEMPLATE_KEY, TEMPLATE_NAMES, TEMPLATES, render
from utils.cli import add_inference_args

SOURCE_PACKAGES = ("models", "utils", "openai_demo", "scripts")


def python_files(with_tests: bool = False):
    """{path relative to the repository: path} of the project's Python files (golden data aside)."""
    paths = [os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")]
    for package in SOURCE_PACKAGES + (("tests",) if with_tests else ()):
        for folder, folders, names in os.walk(os.path.join(ROOT, package)):
            folders[:] = [f for f in folders if f != "golden"]
            paths += [os.path.join(folder, name) for name in names if name.endswith(".py")]
    return {os.path.relpath(path, ROOT): path for path in paths if os.path.abspath(path) != os.path.abspath(__file__)}


def parsed(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def string_constants(path):
    """(line, text) of every string constant in the file except docstrings."""
    tree = parsed(path)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def copies(pattern: str, owners, with_tests: bool = False):
    """'file:line text' for each string constant matching `pattern` outside the files `owners`."""
    found = re.compile(pattern)
    return [f"{name}:{line} {text[:80]!r}" for name, path in sorted(python_files(with_tests).items())
            if name not in owners for line, text in string_constants(path) if found.search(text)]


def test_the_scan_sees_strings_but_not_docstrings(tmp_path):
    scratch = tmp_path / "scratch.py"
    scratch.write_text('"""Question: {query} Answer:"""\ndef f():\n    """doc"""\n    return "Short answer:"\n')
    assert string_constants(str(scratch)) == [(4, "Short answer:")]


# Templates --------------------------------------------------------------------------------------

HF_COPY = "models/hf_cogvlm/configuration_cogvlm.py"


def test_the_hf_code_carries_an_exact_copy_of_the_templates():
    """configuration_cogvlm.py stands alone in converted checkpoints (trust_remote_code), so it holds a copy."""
    owner = {name: (t.query, t.turn, t.answer_separator) for name, t in TEMPLATES.items()}
    assert configuration_cogvlm.PROMPT_TEMPLATES == owner
    assert configuration_cogvlm.TEMPLATE_VERSIONS == TEMPLATE_NAMES
    assert configuration_cogvlm.DEFAULT_TEMPLATE == DEFAULT_TEMPLATE
    assert configuration_cogvlm.CogVLMConfig().template_version == DEFAULT_TEMPLATE


def test_no_other_code_spells_a_template():
    assert not copies(r"Answer:|Short answer|\bQuestion: ", {"models/templates.py", HF_COPY})


def test_no_other_code_lists_the_template_names():
    listed = re.compile(r"\b" + r"\W{1,6}".join(TEMPLATE_NAMES[:2]) + r"\b")
    assert not copies(listed.pattern, {"models/templates.py"})
    tuples = []
    for name, path in python_files().items():
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1 and all(
                    isinstance(e, ast.Constant) and e.value in TEMPLATE_NAMES for e in node.elts):
                tuples.append(f"{name}:{node.lineno}")
    assert not tuples, tuples


def test_the_version_flag_offers_the_owners_templates():
    version = next(a for a in add_inference_args(argparse.ArgumentParser())._actions if a.dest == "version")
    assert version.metavar == "{" + ",".join(TEMPLATE_NAMES) + "}" and version.default is None
    assert all(name in version.help for name in TEMPLATE_NAMES) and DEFAULT_TEMPLATE in version.help


def test_checkpoint_metadata_keeps_its_key():
    """Files in checkpoints/ and tests/golden/ say `template_version`; the typed config calls it `template`."""
    assert TEMPLATE_KEY == "template_version"
    config = CogVLMConfig.from_sat_dict(_tiny_sat_dict() | {TEMPLATE_KEY: "vqa"})
    assert config.template == "vqa" and config.to_sat_dict()[TEMPLATE_KEY] == "vqa"
    assert config.to_hf_dict()[TEMPLATE_KEY] == "vqa" and config.to_hf_dict(template="base")[TEMPLATE_KEY] == "base"


def _tiny_sat_dict():
    return {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10, "inner_hidden_size": 16,
            "eva_args": {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "inner_hidden_size": 16,
                         "image_size": 28, "patch_size": 14}}


def test_render_is_the_template_data():
    assert render("base", "q", [("a", "b")], with_image=False) == "q"  # base shows no history
    assert render("chat", "q", [("a", "b")]) == "<EOI>Question: a Answer: b\nQuestion: q Answer:"


# Released checkpoints ---------------------------------------------------------------------------

def test_no_other_code_names_a_release():
    """Tests too: they name releases through the registry."""
    pattern = r"cogvlm-(base|chat|grounding)-|THUDM/|lmsys/vicuna"
    assert not copies(pattern, {"models/releases.py"}, with_tests=True)


def test_the_registry_is_consistent():
    assert DEFAULT_CHECKPOINT in RELEASED_CHECKPOINTS and DEFAULT_FINETUNE_CHECKPOINT in RELEASED_CHECKPOINTS
    for name, release in RELEASED_CHECKPOINTS.items():
        assert release.template in TEMPLATE_NAMES and release.zip_file.startswith(name), name
        assert release.hf_repo.startswith("THUDM/cogvlm-") and release.hf_repo.endswith("-hf"), name
        assert release.image_size in (224, 490) and str(release.image_size) in release.description, name
    assert {name for name, r in RELEASED_CHECKPOINTS.items() if r.grounding} == {
        name for name in RELEASED_CHECKPOINTS if "grounding" in name}


# LoRA key markers -------------------------------------------------------------------------------

def test_no_other_code_spells_a_lora_marker():
    assert not copies(r"matrix_[AB]|\.original\.", {"models/checkpoint/layout.py"})


def test_the_markers_are_sats_lora_names():
    from sat.model.finetune.lora2 import replace_linear_with_lora

    wrapped = torch.nn.Module()
    wrapped.dense = replace_linear_with_lora(torch.nn.Linear(4, 6), 1, 2)
    keys = {f".{key}" for key in wrapped.state_dict()}
    assert {f"{LORA_ORIGINAL}weight", f"{LORA_A}0", f"{LORA_B}0"} <= {key.replace(".dense", "", 1) for key in keys}
    assert all(any(marker in f"x{key}" for marker in LORA_MARKERS) for key in keys)


# Shared flags -----------------------------------------------------------------------------------

SHARED_FLAGS = {"--from_pretrained", "--local_tokenizer", "--version", "--max_length", "--fp16", "--bf16"}


def test_the_shared_flags_are_declared_once():
    """finetune_demo.py, merge_model.py and the scripts take them from utils/cli.py."""
    declared = []
    for name, path in python_files().items():
        if name == "utils/cli.py":
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                flags = {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
                if flags & SHARED_FLAGS and not flags >= {"--version", "--template_version"}:
                    declared.append(f"{name}:{node.lineno} {sorted(flags)}")
    # convert_checkpoint.py's --version also answers to the HF config's spelling, --template_version
    assert not declared, declared


# Lengths ----------------------------------------------------------------------------------------

def test_context_length_is_only_the_outside_worlds_word():
    """GGUF's `context_length` (the model's positions) and OpenAI's `context_length_exceeded` stay theirs; in
    our code a prompt's tokens are `prompt_length`, a sequence's `max_length`, the model's positions
    `max_sequence_length` (models.config.CogVLMConfig)."""
    found = []
    for name, path in python_files(with_tests=True).items():
        for node in ast.walk(parsed(path)):
            names = {getattr(node, attr, None) for attr in ("id", "attr", "arg", "name")}
            if isinstance(node, ast.Constant):
                names.add(node.value)
            if "context_length" in names:
                found.append(f"{name}:{getattr(node, 'lineno', 0)}")
    assert not found, found


@pytest.mark.parametrize("field", ["max_sequence_length", "prompt_length", "max_length", "max_target_length"])
def test_the_typed_config_says_what_each_length_is(field):
    assert field in CogVLMConfig.__doc__
