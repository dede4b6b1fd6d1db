"""GGUF export for llama.cpp (`scripts/convert_checkpoint.py SRC OUT.gguf --to gguf`), checked with llama.cpp
itself (llama-cpp-python, requirements-dev.txt) as an independent implementation on the golden bundle.

Text prompts are laid out alike on both sides, so llama.cpp must reproduce the reference. Image prompts:
llama.cpp lays them out its own way (bench/llamacpp.py's docstring), so it must reproduce our model given
llama.cpp's layout (`llamacpp_layout`); its ViT differs by its F16 patch convolution and tanh-table GELU.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import gguf
import jinja2.sandbox
import numpy as np
import pytest
import sentencepiece
import torch
from PIL import Image

from bench.llamacpp import LlamaCpp, llamacpp_layout, ours_greedy, relative_error
from conftest import IMAGE_CASES, ROOT
from llama_cpp import mtmd_cpp
from models.checkpoint import open_checkpoint
from models.checkpoint.gguf_format import (MEDIA_MARKER, chat_template, gguf_tensors, language_model_tensors,
                                          mmproj_path_for, mmproj_tensors)
from models.checkpoint.layout import tensor_table
from scripts import convert_checkpoint
from models.templates import IMAGE_MARKER, TEMPLATES, render as history_to_prompt
from utils.vision import CLIP_MEAN, CLIP_STD

NEW_TOKENS = 16
IMAGE_START = 19  # [bos] [boi] 16 patches [eoi]: the text of the bundle's image prompts starts here
# What llama.cpp's image path adds to the reference's fp32 numbers (max|diff| / max|reference|): its patch
# convolution runs in F16 and its GELU is the tanh form read from an F16 table (CogVLM's is erf). Measured:
# image embeddings 1.0e-3, image-prompt logits <= 7.7e-4 on the bundle.
IMAGE_PATH_TOLERANCE = 2e-3
FP32_TOLERANCE = 1e-4  # the bundle's own


def convert(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert_checkpoint.main(list(argv))
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def export(golden, tmp_path_factory):
    """The bundle converted to an f32 GGUF pair as a user would: (model path, mmproj path)."""
    out = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    rc, err = convert(golden.checkpoint, out, "--to", "gguf", "--tokenizer", golden.tokenizer_dir)
    assert rc == 0, err
    return out, mmproj_path_for(out)


@pytest.fixture(scope="module")
def llama(export):
    runtime = LlamaCpp(*export, threads=2, context=256)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def pixels(golden):
    """The bundle's image resized as our processor resizes it (llama.cpp letterboxes other sizes)."""
    return np.asarray(Image.open(golden.image_path).convert("RGB").resize((56, 56), Image.BICUBIC))


def gguf_arrays(path):
    return {t.name: (t, np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


def test_export_holds_every_weight_in_llamacpps_layout(golden, export):
    model_path, mmproj_path = export
    config = open_checkpoint(golden.checkpoint).config
    checkpoint = torch.load(f"{golden.checkpoint}/1/mp_rank_00_model_states.pt", weights_only=True)["module"]
    stored = {**gguf_arrays(model_path), **gguf_arrays(mmproj_path)}
    assert len(stored) == len(tensor_table(config)) - 1  # every tensor but the rotary table, once
    for spec in language_model_tensors(config, gguf.GGMLQuantizationType.F32) + \
            mmproj_tensors(config, gguf.GGMLQuantizationType.F32):
        reader_tensor, data = stored[spec.name]
        expected = checkpoint[spec.sat_key].numpy()
        if spec.name == "v.position_embd.weight":  # llama.cpp's ViT puts the CLS token after the patches
            expected = np.concatenate([expected[1:], expected[:1]])
        assert tuple(reversed([int(d) for d in reader_tensor.shape])) == spec.shape, spec.name
        assert np.array_equal(data.reshape(spec.shape), expected), spec.name
    reader = gguf.GGUFReader(model_path)
    metadata = {field.name: field.contents() for field in reader.fields.values()}
    assert metadata["general.architecture"] == "cogvlm"
    assert (metadata["cogvlm.block_count"], metadata["cogvlm.embedding_length"],
            metadata["cogvlm.attention.head_count"], metadata["cogvlm.rope.dimension_count"]) == (2, 64, 4, 16)
    pieces = sentencepiece.SentencePieceProcessor(model_file=os.path.join(golden.tokenizer_dir, "tokenizer.model"))
    assert metadata["tokenizer.ggml.tokens"] == [pieces.id_to_piece(i) for i in range(pieces.get_piece_size())]
    vision = {field.name: field.contents() for field in gguf.GGUFReader(mmproj_path).fields.values()}
    assert vision["clip.projector_type"] == "cogvlm" and bool(vision["clip.use_gelu"])
    assert np.allclose(vision["clip.vision.image_mean"], CLIP_MEAN) and np.allclose(vision["clip.vision.image_std"],
                                                                                      CLIP_STD)


def test_hf_source_gives_the_same_tensors(golden, export, tmp_path):
    out = str(tmp_path / "from-hf.gguf")
    rc, err = convert(os.path.join(ROOT, "tests", "golden", "tiny-small-hf"), out, "--to", "gguf",
                      "--tokenizer", golden.tokenizer_dir)
    assert rc == 0, err
    for ours, theirs in ((out, export[0]), (mmproj_path_for(out), export[1])):
        a, b = gguf_arrays(ours), gguf_arrays(theirs)
        assert a.keys() == b.keys() and all(np.array_equal(a[k][1], b[k][1]) for k in a)


def test_text_prompt_reproduces_the_reference(golden, llama):
    ids = golden["text_only.input_ids"].tolist()
    logits = llama.decode(list(range(len(ids))), ids)
    assert relative_error(logits, golden["text_only.logits"]) <= FP32_TOLERANCE
    tokens, steps = llama.greedy(logits[-1], len(ids), NEW_TOKENS)
    assert tokens == golden["text_only.gen_ids"].tolist()
    assert relative_error(steps, golden["text_only.step_logits"]) <= FP32_TOLERANCE
    llama.reset()


def test_tokenizer_in_the_gguf_splits_every_prompt_as_ours(golden, llama):
    for name in IMAGE_CASES + ["text_only"]:
        prompt, ids = golden.case(name)["prompt"], golden[f"{name}.input_ids"].tolist()
        if name == "text_only":
            assert llama.tokenize(prompt, add_bos=True) == ids
        else:
            assert llama.tokenize(prompt.split(IMAGE_MARKER, 1)[1]) == ids[IMAGE_START:], name


def test_image_embeddings_of_libmtmd(golden, llama, pixels):
    embeddings = llama.image_embeddings(pixels)
    checkpoint = torch.load(f"{golden.checkpoint}/1/mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert np.array_equal(embeddings[0], checkpoint["mixins.eva.boi"].reshape(-1).numpy())
    assert np.array_equal(embeddings[-1], checkpoint["mixins.eva.eoi"].reshape(-1).numpy())
    assert relative_error(embeddings[1:-1], golden["image_emb"][0]) <= IMAGE_PATH_TOLERANCE


def case_prompt(golden, name):
    return dict(input_ids=golden[f"{name}.input_ids"][None], position_ids=golden[f"{name}.position_ids"][None],
                image_embed_mask=golden[f"{name}.image_embed_mask"][None],
                vision_expert_mask=golden[f"{name}.vision_expert_mask"][None], images=golden["image"])


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_prompt_matches_ours_in_llamacpps_layout(golden, golden_model, llama, pixels, name):
    model, _ = golden_model
    ids = golden[f"{name}.input_ids"].tolist()
    text = ids[IMAGE_START:]
    ours_tokens, ours_logits = ours_greedy(model, llamacpp_layout(case_prompt(golden, name)), NEW_TOKENS)
    ours_text, ours_steps = ours_logits[IMAGE_START:len(ids)], ours_logits[len(ids) - 1:]
    # llama.cpp's own path: libmtmd encodes the pixels and places the image block at positions 1..18
    llama.reset()
    logits, position = llama.image_prompt(pixels, text, ids[0])
    assert position == len(ids)  # positions run on through the image block (CogVLM's text would start at 4)
    tokens, steps = llama.greedy(logits[-1], position, NEW_TOKENS)
    assert tokens == ours_tokens
    assert relative_error(logits, ours_text) <= IMAGE_PATH_TOLERANCE
    assert relative_error(steps, ours_steps) <= IMAGE_PATH_TOLERANCE
    llama.reset()  # the bench's prefill, which asks for the last logits only, gives the same ones
    last_only = llama.image_prompt(pixels, text, ids[0], all_logits=False)[0]
    assert last_only.shape == (1, logits.shape[1]) and relative_error(last_only[0], logits[-1]) <= FP32_TOLERANCE
    # the language model alone, given our image embeddings: fp32 agreement
    with torch.no_grad():
        eva = model.get_mixin("eva")
        ours_embeddings = eva.linear_proj(eva.vit_model(golden["image"])[0])[0].numpy()
    block = np.concatenate([eva.boi.detach().reshape(1, -1).numpy(), ours_embeddings,
                            eva.eoi.detach().reshape(1, -1).numpy()])
    llama.reset()
    logits, position = llama.embedded_image_prompt(block, text, ids[0])
    tokens, steps = llama.greedy(logits[-1], position, NEW_TOKENS)
    assert tokens == ours_tokens
    assert relative_error(logits, ours_text) <= FP32_TOLERANCE and relative_error(steps, ours_steps) <= FP32_TOLERANCE
    llama.reset()


EXPECTED_TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q5_0"}
# max|logits - reference| / max|reference| on the text prompt, measured: f16 7.2e-4, bf16 5.9e-3, q8_0 ~1e-2,
# q4_0 / q4_k ~1e-1 (hidden 64 is below a K-quant's 256-value block: llama.cpp falls back to Q5_0)
QUANTIZED_TOLERANCE = {"f16": 3e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 0.3, "q4_k": 0.3}


@pytest.mark.parametrize("outtype", list(EXPECTED_TYPES))
def test_smaller_outtypes_run_in_llamacpp(golden, tmp_path, outtype):
    out = str(tmp_path / f"tiny-{outtype}.gguf")
    rc, err = convert(golden.checkpoint, out, "--to", "gguf", "--outtype", outtype, "--tokenizer", golden.tokenizer_dir)
    assert rc == 0, err
    types = {name: qtype.name for name, qtype, _ in gguf_tensors(out)}
    assert types["blk.0.attn_qkv.weight"] == EXPECTED_TYPES[outtype] and types["blk.0.attn_norm.weight"] == "F32"
    vision = {name: qtype.name for name, qtype, _ in gguf_tensors(mmproj_path_for(out))}
    assert vision["v.blk.0.attn_qkv.weight"] == ("Q8_0" if outtype.startswith("q") else EXPECTED_TYPES[outtype])
    # ggml's AMX product crashes on multi-row batches of quantized weights (LlamaCpp's docstring)
    runtime = LlamaCpp(out, mmproj_path_for(out), threads=2, context=64, extra_buffers=False)
    ids = golden["text_only.input_ids"].tolist()
    try:
        logits = runtime.decode(list(range(len(ids))), ids)
        assert relative_error(logits, golden["text_only.logits"]) <= QUANTIZED_TOLERANCE[outtype]
        assert runtime.image_embeddings(np.zeros((56, 56, 3), np.uint8)).shape == (18, 64)
    finally:
        runtime.close()


def test_chat_template_lays_out_our_prompts():
    assert MEDIA_MARKER == mtmd_cpp.mtmd_default_marker().decode()
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment()
    history = [("What is it?", "A cat.")]
    for version, template in TEMPLATES.items():
        render = environment.from_string(chat_template(template.query, template.turn)).render
        messages = [{"role": "user", "content": MEDIA_MARKER + "What is it?"},
                    {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And its color?"}]
        expected = history_to_prompt(version, "And its color?", history).replace(IMAGE_MARKER, MEDIA_MARKER)
        assert render(messages=messages) == expected, version
        assert render(messages=messages[2:]) == history_to_prompt(version, "And its color?", with_image=False)


def test_bad_gguf_requests_are_one_line_errors(golden, tmp_path):
    out = str(tmp_path / "m.gguf")
    cases = [((golden.checkpoint, out, "--outtype", "f16"), "--outtype applies to --to gguf only"),
             ((golden.checkpoint, out, "--to", "gguf", "--max_shard_size", "1MB"), "--max_shard_size applies"),
             ((golden.checkpoint, str(tmp_path / "m.bin"), "--to", "gguf", "--tokenizer", golden.tokenizer_dir),
              "does not end in .gguf"),
             ((golden.checkpoint, out, "--to", "gguf"), "carries no tokenizer"),
             ((golden.checkpoint, out, "--to", "gguf", "--tokenizer", str(tmp_path)), "has no tokenizer.model"),
             ((golden.checkpoint, str(tmp_path / "no" / "m.gguf"), "--to", "gguf", "--tokenizer", golden.tokenizer_dir),
              "directory does not exist")]
    for argv, message in cases:
        rc, err = convert(*argv)
        lines = err.strip().splitlines()
        assert rc == 1 and lines[-1].startswith("error: ") and message in lines[-1], (argv, err)
    assert os.listdir(tmp_path) == []
    (tmp_path / "mmproj-m.gguf").write_text("x")
    rc, err = convert(golden.checkpoint, out, "--to", "gguf", "--tokenizer", golden.tokenizer_dir)
    assert rc == 1 and "exists" in err.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["mmproj-m.gguf"]


DISK_FULL = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    from scripts import convert_checkpoint
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # no file over 300 kB: a full disk
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert_checkpoint.main(sys.argv[1:])
    print(json.dumps([rc, err.getvalue()]))
""")


def test_full_disk_leaves_no_gguf(golden, tmp_path):
    out = subprocess.run([sys.executable, "-c", DISK_FULL, golden.checkpoint, str(tmp_path / "m.gguf"), "--to", "gguf",
                          "--tokenizer", golden.tokenizer_dir], capture_output=True, text=True, cwd=ROOT, timeout=300)
    rc, err = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 1 and "no space left" in err.strip().splitlines()[-1], err
    assert os.listdir(tmp_path) == []


def test_bench_compares_every_precision_it_is_given(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "llamacpp.py"), "--config", "tiny",
                          "--precisions", "fp32", "int4", "--rounds", "1", "--new_tokens", "4", "--threads", "1",
                          "--dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0 and "failed" not in out.stdout, out.stdout + out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("fp32", "int4"))]
    assert [(r[0], r[1]) for r in rows] == [("fp32", "ours"), ("fp32", "llama.cpp"), ("int4", "ours"),
                                            ("int4", "llama.cpp")]
    assert all(float(r[4]) > 0 for r in rows)  # decode tok/s
    assert re.fullmatch(r"ours/llama\.cpp decode: fp32 \d+\.\d\dx int4 \d+\.\d\dx", out.stdout.splitlines()[-1])
