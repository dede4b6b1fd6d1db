"""Model-parallel inference under torchrun (2 ranks, gloo on CPU) and merge_model.py split / merge.

The 2-rank runs are real `torchrun` launches: one runs this file as a worker (every checkpoint kind
loaded on 2 ranks, logits and greedy tokens saved by rank 0), one drives the CLI from a script, one
starts the CLI on a checkpoint whose rank-1 shard is corrupt.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import GOLDEN_DIR, ROOT, Golden, assert_close_rel, inference_args

NEW_TOKENS = 16
GOLDEN_CASES = ["chat_hist", "text_only"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2"]


def torchrun(*argv, stdin=None, timeout=240):
    return subprocess.run([*TORCHRUN, *argv], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def merge_model(*argv):
    import merge_model

    assert merge_model.main(list(argv)) == 0


def load_module(path):
    return torch.load(path, weights_only=True)["module"]


def shard_path(ckpt, rank=0):
    return os.path.join(ckpt, "1", f"mp_rank_{rank:02d}_model_states.pt")


# What both the 2-rank worker and the 1-rank references compute ---------------------------------

def golden_case_inputs(golden, name):
    from test_golden import case_inputs

    return case_inputs(golden, name)


def tiny_forward_inputs(model_args):
    from test_tiny_config import image_inputs

    inputs, image = image_inputs(model_args)
    return dict(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                attention_mask=inputs["attention_mask"], vision_expert_mask=inputs["vision_expert_mask"],
                image_embed_mask=inputs["image_embed_mask"], images=image["image"])


def greedy_tokens(model, model_args, golden, tokenizers, name):
    from conftest import chat_turn
    from test_golden import processor_for
    from utils.generation_config import GenerationConfig

    case = golden.case(name)
    processor = processor_for(golden, tokenizers, name, model_args)
    image_path = None if name == "text_only" else golden.image_path
    query = "Hello, who are you?" if name == "text_only" else case["query"]
    config = GenerationConfig(max_length=case["seq_len"] + NEW_TOKENS, top_k=1, end_token_ids=[])
    stream = chat_turn(model, processor, image_path, query, case.get("history", []), config)
    list(stream)
    return torch.tensor(stream.token_ids)


@torch.no_grad()
def compute_results(checkpoints, rank, world_size):
    """{name.what: tensor} for every checkpoint, loaded as rank `rank` of `world_size`."""
    from models.checkpoint import load_model
    from utils.language import llama2_tokenizer

    golden = Golden(GOLDEN_DIR)
    tokenizers = {sig: llama2_tokenizer(golden.tokenizer_dir, sig) for sig in ("base", "chat", "vqa")}
    results = {}
    for name, ckpt in checkpoints.items():
        model, model_args = load_model(ckpt, rank=rank, world_size=world_size)
        if name == "tiny":
            results["tiny.logits"] = model(**tiny_forward_inputs(model_args))[0][0]
            continue
        for case in GOLDEN_CASES:
            results[f"{name}.{case}.logits"] = model(**golden_case_inputs(golden, case))[0][0]
        if name != "lora":
            for case in GOLDEN_CASES:
                results[f"{name}.{case}.gen_ids"] = greedy_tokens(model, model_args, golden, tokenizers, case)
    return results


def _worker(spec_path):
    """Entry point under torchrun: every rank computes, rank 0 saves."""
    spec = json.load(open(spec_path))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = compute_results(spec["checkpoints"], rank, world_size)
    if rank == 0:
        torch.save(results, spec["out"])


# Fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-parallel")


@pytest.fixture(scope="module")
def golden_mp2(golden, work_dir):
    out = str(work_dir / "golden-mp2")
    merge_model("--from_pretrained", golden.checkpoint, "--model_parallel_size", "2", "--save", out)
    return out


@pytest.fixture(scope="module")
def lora_checkpoint(golden, work_dir):
    """The bundle's checkpoint with its LoRA matrices, saved unmerged by SAT (a finetuning result)."""
    from sat.training.model_io import save_checkpoint
    from models import FineTuneTestCogVLMModel
    from test_golden import LORA_PREFIX

    model, model_args = FineTuneTestCogVLMModel.from_pretrained(
        golden.checkpoint, args=inference_args(), overwrite_args={"use_lora": True, "lora_rank": 4})
    lora = {k[len(LORA_PREFIX):]: v for k, v in golden.tensors.items() if k.startswith(LORA_PREFIX)}
    assert not model.load_state_dict(lora, strict=False).unexpected_keys
    model_args.save = str(work_dir / "lora")
    save_checkpoint(1, model, None, None, model_args)
    return model_args.save


@pytest.fixture(scope="module")
def two_rank_results(golden, golden_mp2, lora_checkpoint, tiny_checkpoint, work_dir):
    checkpoints = {"golden": golden.checkpoint, "golden_mp2": golden_mp2, "lora": lora_checkpoint,
                   "tiny": tiny_checkpoint}
    spec = work_dir / "spec.json"
    spec.write_text(json.dumps({"checkpoints": checkpoints, "out": str(work_dir / "results.pt")}))
    proc = torchrun(os.path.join("tests", "test_model_parallel.py"), str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(work_dir / "results.pt")


# Two ranks equal one ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["golden", "golden_mp2"])
def test_two_ranks_match_one_rank_and_golden(golden, golden_model, two_rank_results, name):
    """An unsplit checkpoint split on the fly and a 2-way one read shard by shard give the 1-rank
    logits and greedy tokens."""
    model, _ = golden_model
    for case in GOLDEN_CASES:
        logits = two_rank_results[f"{name}.{case}.logits"]
        with torch.no_grad():
            assert_close_rel(logits, model(**golden_case_inputs(golden, case))[0][0], what=f"{name} {case} vs 1 rank")
        assert_close_rel(logits, golden[f"{case}.logits"], what=f"{name} {case} vs golden")
        assert two_rank_results[f"{name}.{case}.gen_ids"].tolist() == golden[f"{case}.gen_ids"].tolist()


def test_two_ranks_second_config(tiny_checkpoint, two_rank_results):
    """Other head count, widths and image size (6 heads -> 3 per rank, ViT 2 heads -> 1)."""
    from models import CogVLMModel

    model, model_args = CogVLMModel.from_pretrained(tiny_checkpoint, args=inference_args())
    with torch.no_grad():
        expected = model.eval()(**tiny_forward_inputs(model_args))[0][0]
    assert_close_rel(two_rank_results["tiny.logits"], expected, what="tiny 2 ranks vs 1")


def test_two_ranks_lora_checkpoint_is_folded(golden, two_rank_results):
    """SAT's LoRA layers are not model-parallel: on 2 ranks LoRA is folded into the weights on load."""
    assert_close_rel(two_rank_results["lora.chat_hist.logits"], golden["lora.logits_merged"], what="lora 2 ranks")


# Split and merge files ------------------------------------------------------------------------------

def test_split_follows_sat_partition(golden_model):
    """Our split of each layer kind is exactly what SAT's own mpu layers produce."""
    from models.checkpoint.layout import split_rules, split_tensor

    model, _ = golden_model
    layout = split_rules(model.config)
    layers = {"transformer.layers.0.attention.query_key_value": (0, (1, 1, 1)),  # column, stride 3
              "mixins.mlp.gate_proj.0": (0, (1,)),                                 # column
              "mixins.rotary.vision_dense_list.1": (1, (1,)),                      # row
              "transformer.word_embeddings": (0, (1,))}                            # vocabulary
    for name, (dim, blocks) in layers.items():
        module = model.get_submodule(name)
        split = layout[name + ".weight"]
        assert (split.dim, split.blocks) == (dim, blocks)
        expected = module.partition(new_model_parallel_size=2, full_weight=module.weight.data)
        for rank in range(2):
            assert torch.equal(split_tensor(module.weight.data, split, rank, 2), expected[rank]), name
    assert layout["mixins.eva.linear_proj.gate_proj.weight"].dim is None        # GLU adapter: replicated
    assert layout["mixins.eva.vit_model.transformer.layers.0.attention.dense.bias"].dim is None
    assert layout["mixins.eva.vit_model.transformer.layers.0.attention.query_key_value.bias"].dim == 0


def test_split_then_merge_is_bit_identical(golden, golden_mp2, work_dir):
    original = load_module(shard_path(golden.checkpoint))
    shards = [load_module(shard_path(golden_mp2, r)) for r in range(2)]
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    assert shards[0][qkv].shape[0] == original[qkv].shape[0] // 2
    assert json.load(open(os.path.join(golden_mp2, "model_config.json")))["model_parallel_size"] == 2
    merged_dir = str(work_dir / "golden-merged")
    merge_model("--from_pretrained", golden_mp2, "--save", merged_dir)
    merged = load_module(shard_path(merged_dir))
    assert set(merged) == set(original)
    for key, value in original.items():
        assert torch.equal(merged[key], value), key
    assert json.load(open(os.path.join(merged_dir, "model_config.json"))) == json.load(
        open(os.path.join(golden.checkpoint, "model_config.json")))


def test_merge_lora_equals_in_memory_merge(lora_checkpoint, work_dir):
    from models import FineTuneTestCogVLMModel
    from models.checkpoint import model_class_for
    from models.config import CogVLMConfig

    merged_dir = str(work_dir / "lora-merged")
    merge_model("--from_pretrained", lora_checkpoint, "--save", merged_dir)
    config = json.load(open(os.path.join(merged_dir, "model_config.json")))
    assert config["use_lora"] is False
    model, _ = FineTuneTestCogVLMModel.from_pretrained(lora_checkpoint, args=inference_args())
    model.merge_lora()
    expected = model.state_dict()
    merged = load_module(shard_path(merged_dir))
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key
    # and the merged checkpoint loads, every key matched, as a model without LoRA layers
    reloaded, _ = model_class_for(CogVLMConfig.from_sat_dict(config)).from_pretrained(merged_dir, args=inference_args())
    assert "lora" not in reloaded.mixins


def test_merge_casts_to_bf16(golden, work_dir):
    out = str(work_dir / "golden-bf16")
    merge_model("--from_pretrained", golden.checkpoint, "--bf16", "--save", out)
    assert {v.dtype for v in load_module(shard_path(out)).values()} == {torch.bfloat16}


@torch.no_grad()
def test_one_process_quantizes_a_two_way_checkpoint(golden, golden_model, golden_mp2):
    """--quant 8 on a model-parallel checkpoint in one process: merged while loading, then quantized
    (quantizing while loading is for unsplit checkpoints); same int8 model as from the unsplit one."""
    import argparse
    import copy

    from test_golden import case_inputs
    from utils.cli import add_inference_args
    from utils.pipeline import load_pipeline
    from models.kernels.quantization import quantize_model

    args = add_inference_args(argparse.ArgumentParser()).parse_args(
        ["--from_pretrained", golden_mp2, "--local_tokenizer", golden.tokenizer_dir, "--device", "cpu", "--quant", "8"])
    model = load_pipeline(args).model
    reference = quantize_model(copy.deepcopy(golden_model[0]), 8)
    inputs = case_inputs(golden, "chat")
    assert torch.equal(model(**inputs)[0], reference(**inputs)[0])


def test_mismatches_are_clear_errors(golden, golden_mp2, tiny_checkpoint, work_dir, capsys):
    import merge_model as merge_script
    from models.checkpoint import open_checkpoint
    from models.errors import CheckpointError

    # 4 ranks cannot divide the second config's 6 attention heads
    assert merge_script.main(["--from_pretrained", tiny_checkpoint, "--model_parallel_size", "4",
                              "--save", str(work_dir / "tiny-mp4")]) == 1
    assert "attention heads 6" in capsys.readouterr().err
    # a 2-way checkpoint with a shard missing
    broken = str(work_dir / "golden-mp2-missing")
    shutil.copytree(golden_mp2, broken)
    os.remove(shard_path(broken, 1))
    with pytest.raises(CheckpointError, match="model_parallel_size=2 but .* holds mp_rank_00"):
        open_checkpoint(broken).reader()
    # output over an existing checkpoint
    assert merge_script.main(["--from_pretrained", golden_mp2, "--save", golden.checkpoint]) == 1
    assert "not empty" in capsys.readouterr().err


# The CLI under torchrun --------------------------------------------------------------------------

def test_cli_under_torchrun_answers_clears_and_stops(golden, tokenizers):
    case = golden.case("chat")
    stdin = f"{golden.image_path}\n{case['query']}\nclear\n\nHello\nstop\n"
    proc = torchrun("cli_demo.py", "--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir,
                    "--version", "chat", "--top_k", "1", "--max_length", str(case["seq_len"] + NEW_TOKENS),
                    stdin=stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line.split("Model: ", 1)[1] for line in proc.stdout.splitlines() if "Model: " in line]
    assert len(answers) == 2  # printed once (rank 0), an image turn and a text-only turn after `clear`
    expected = tokenizers["chat"].decode(golden["chat.gen_ids"].tolist(), skip_special_tokens=True)
    assert answers[0] == expected.replace("</s>", "").strip()


def test_cli_crash_on_one_rank_ends_all_ranks(golden_mp2, golden, work_dir):
    broken = str(work_dir / "golden-mp2-corrupt")
    shutil.copytree(golden_mp2, broken)
    with open(shard_path(broken, 1), "r+b") as f:
        f.truncate(100)
    proc = torchrun("cli_demo.py", "--from_pretrained", broken, "--local_tokenizer", golden.tokenizer_dir,
                    stdin=f"{golden.image_path}\nWhat is in the image?\n", timeout=180)
    assert proc.returncode != 0
    assert "error (rank 1): cannot read checkpoint file" in proc.stderr
    assert "Model: " not in proc.stdout


if __name__ == "__main__":  # run by torchrun from two_rank_results (tests/ is sys.path[0] here)
    _worker(sys.argv[1])
