"""HF format (`cogvlm-chat-hf` layout): SAT <-> HF conversion and loading HF directories.

The fixtures `golden/tiny-small-hf` (one file) and `golden/tiny-small-hf-sharded` (2 shards + index) hold
the golden bundle's weights in HF layout, written independently of our code.
"""
import argparse
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ALL_CASES, ROOT, assert_close_rel, inference_args
from models import checkpoint as ckpt
from models.checkpoint import loader
from models.checkpoint.hf_format import HFFiles
from models.checkpoint.memory import release_consumed
from models.checkpoint.sat_format import write_sat_checkpoint
from models.config import CogVLMConfig
from models.errors import CheckpointError

HF_DIR = os.path.join(ROOT, "tests", "golden", "tiny-small-hf")
HF_SHARDED_DIR = os.path.join(ROOT, "tests", "golden", "tiny-small-hf-sharded")
NEW_TOKENS = 16


def hf_tensors(hf_dir):
    """All tensors of an HF directory, single-file or sharded."""
    tensors = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(hf_dir, name)))
    return tensors


def sat_state(ckpt_dir):
    return torch.load(os.path.join(ckpt_dir, "1", "mp_rank_00_model_states.pt"), weights_only=True)["module"]


def assert_same_tensors(actual, expected):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def case_inputs(golden, name):
    length = golden[f"{name}.input_ids"].shape[0]
    inputs = dict(input_ids=golden[f"{name}.input_ids"][None], position_ids=golden[f"{name}.position_ids"][None],
                  attention_mask=torch.ones(1, 1, length, length).tril())
    if name != "text_only":
        inputs.update(vision_expert_mask=golden[f"{name}.vision_expert_mask"][None],
                      image_embed_mask=golden[f"{name}.image_embed_mask"][None], images=golden["image"])
    return inputs


# SAT -> HF -> SAT ------------------------------------------------------------------------------

def test_sat_to_hf_equals_the_independent_hf_fixture(golden, tmp_path):
    out = str(tmp_path / "hf")
    assert ckpt.convert_sat_to_hf(golden.checkpoint, out) == ["model.safetensors"]
    assert_same_tensors(hf_tensors(out), hf_tensors(HF_DIR))
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(HF_DIR, "config.json")))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sat_to_hf_sharded_with_index(golden, tmp_path):
    out = str(tmp_path / "hf")
    files = ckpt.convert_sat_to_hf(golden.checkpoint, out, max_shard_bytes=ckpt.parse_size("0.5MB"))
    assert len(files) >= 4  # 1.88 MB of tensors
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    reference = json.load(open(os.path.join(HF_SHARDED_DIR, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == reference["metadata"]["total_size"]
    assert set(index["weight_map"]) == set(reference["weight_map"]) and set(index["weight_map"].values()) == set(files)
    for name in files:
        assert os.path.getsize(os.path.join(out, name)) < 0.5e6 + 4096  # tensors + header
        with safe_open(os.path.join(out, name), "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == name} == set(f.keys())
    assert_same_tensors(hf_tensors(out), hf_tensors(HF_DIR))


def test_sat_to_hf_to_sat_is_bit_identical(golden, tmp_path):
    hf_dir, sat_dir = str(tmp_path / "hf"), str(tmp_path / "sat")
    ckpt.convert_sat_to_hf(golden.checkpoint, hf_dir, max_shard_bytes=700_000)
    ckpt.convert_hf_to_sat(hf_dir, sat_dir)
    assert_same_tensors(sat_state(sat_dir), sat_state(golden.checkpoint))
    original = json.load(open(os.path.join(golden.checkpoint, "model_config.json")))
    round_trip = json.load(open(os.path.join(sat_dir, "model_config.json")))
    # bos/eos/pad in SAT's file are unused argument defaults; everything that shapes the model survives
    assert {k: v for k, v in original.items() if not k.endswith("_token_id")} == round_trip
    assert open(os.path.join(sat_dir, "latest")).read().strip() == "1"


def test_hf_to_sat_to_hf_keeps_bf16_bit_identical(tmp_path):
    """Half-precision weights stay half precision both ways, and config.json says so."""
    bf16_dir, sat_dir, back = tmp_path / "bf16", str(tmp_path / "sat"), str(tmp_path / "back")
    bf16_dir.mkdir()
    shutil.copy(os.path.join(HF_DIR, "config.json"), bf16_dir)
    tensors = {k: v if "inv_freq" in k else v.bfloat16() for k, v in hf_tensors(HF_DIR).items()}
    save_file(tensors, str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
    ckpt.convert_hf_to_sat(str(bf16_dir), sat_dir)
    assert sat_state(sat_dir)["mixins.lm.lm_head.weight"].dtype == torch.bfloat16
    ckpt.convert_sat_to_hf(sat_dir, back)
    assert_same_tensors(hf_tensors(back), tensors)
    assert json.load(open(os.path.join(back, "config.json")))["torch_dtype"] == "bfloat16"


def split_like_sat(model, ranks):
    """Per-rank state dicts as SAT's model-parallel layers partition them (their own `partition` methods)."""
    from sat.mpu import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    full = model.state_dict()
    shards = [dict(full) for _ in range(ranks)]
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            continue  # replicated (SAT keeps the ViT's one-word CLS "vocabulary" in a plain nn.Embedding)
        weights, biases = module.partition(new_model_parallel_size=ranks)
        for rank in range(ranks):
            shards[rank][f"{name}.weight"] = weights[rank]
            if biases:
                shards[rank][f"{name}.bias"] = biases[rank]
    return shards


def test_model_parallel_shards_are_merged(golden, golden_model, tmp_path):
    model, _ = golden_model
    sat_dir = tmp_path / "mp2"
    (sat_dir / "1").mkdir(parents=True)
    config = json.load(open(os.path.join(golden.checkpoint, "model_config.json")))
    config["model_parallel_size"] = 2
    json.dump(config, open(sat_dir / "model_config.json", "w"))
    (sat_dir / "latest").write_text("1")
    shards = split_like_sat(model, 2)
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    assert shards[0][qkv].shape == (96, 64) and not torch.equal(shards[0][qkv], shards[1][qkv])
    for rank, shard in enumerate(shards):
        torch.save({"module": shard}, sat_dir / "1" / f"mp_rank_{rank:02d}_model_states.pt")
    out = str(tmp_path / "hf")
    ckpt.convert_sat_to_hf(str(sat_dir), out)
    assert_same_tensors(hf_tensors(out), hf_tensors(HF_DIR))


def test_hf_reader_gives_each_rank_its_sat_share(golden_model):
    """Under torchrun each process reads its model-parallel share straight from an HF directory."""
    model, _ = golden_model
    reader = ckpt.open_checkpoint(HF_SHARDED_DIR).reader()
    for rank, expected in enumerate(split_like_sat(model, 2)):
        assert_same_tensors(dict(reader.items(rank, 2)), expected)
    assert reader.unconsumed() == []


def test_missing_rotary_buffer_is_recomputed(golden, tmp_path):
    """Some HF exports leave out the per-layer inv_freq buffers; it is a fixed function of the head size."""
    hf_dir = tmp_path / "no-rotary"
    hf_dir.mkdir()
    shutil.copy(os.path.join(HF_DIR, "config.json"), hf_dir)
    save_file({k: v for k, v in hf_tensors(HF_DIR).items() if "inv_freq" not in k}, str(hf_dir / "model.safetensors"))
    ckpt.convert_hf_to_sat(str(hf_dir), str(tmp_path / "sat"))
    assert_same_tensors(sat_state(str(tmp_path / "sat")), sat_state(golden.checkpoint))


# Loading HF directories -------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[HF_DIR, HF_SHARDED_DIR], ids=["single", "sharded"])
def hf_model(request):
    from models import CogVLMModel

    model, model_args = CogVLMModel.from_pretrained(request.param, args=inference_args())
    return model.eval(), model_args


@torch.no_grad()
def test_hf_directory_reproduces_golden_logits(golden, hf_model):
    model, model_args = hf_model
    assert model_args.image_length == 16 and model_args.eva_args["image_size"] == [56, 56]
    for name in ALL_CASES:
        assert_close_rel(model(**case_inputs(golden, name))[0][0], golden[f"{name}.logits"], what=f"{name}.logits")
    eva = model.get_mixin("eva")
    assert_close_rel(eva.linear_proj(eva.vit_model(golden["image"])[0]), golden["image_emb"], what="image_emb")


def test_lora_finetuning_starts_from_hf_directory(golden):
    """finetune_demo.py's loader: LoRA-wrapped linears take the HF base weights, LoRA matrices start fresh."""
    from models import FineTuneTrainCogVLMModel

    args = inference_args()
    args.mode, args.skip_init = "finetune", False
    model, _ = FineTuneTrainCogVLMModel.from_pretrained(HF_SHARDED_DIR, args=args,
                                                        overwrite_args={"use_lora": True, "lora_rank": 4})
    state, reference = model.state_dict(), sat_state(golden.checkpoint)
    for key in ("transformer.layers.1.attention.query_key_value", "mixins.eva.vit_model.transformer.layers.0.attention.dense"):
        assert torch.equal(state[f"{key}.original.weight"], reference[f"{key}.weight"])
    assert sum(".matrix_A." in key for key in state) == 16


def test_front_end_loading_gives_golden_greedy_tokens(golden, tokenizers):
    """load_pipeline (what the CLI, web demo and API use) takes an HF directory as --from_pretrained."""
    from conftest import chat_turn
    from utils.generation_config import GenerationConfig
    from utils.language import llama2_text_processor_inference
    from utils.cli import add_inference_args
    from utils.pipeline import load_pipeline

    args = add_inference_args(argparse.ArgumentParser()).parse_args(
        ["--from_pretrained", HF_SHARDED_DIR, "--local_tokenizer", golden.tokenizer_dir, "--device", "cpu"])
    bundle = load_pipeline(args)
    for name in ALL_CASES:
        case = golden.case(name)
        signal = case.get("signal_type", "chat")
        processor = llama2_text_processor_inference(tokenizers[signal], case["seq_len"] + NEW_TOKENS,
                                                    bundle.model.image_length)
        image = None if name == "text_only" else golden.image_path
        query = "Hello, who are you?" if name == "text_only" else case["query"]
        config = GenerationConfig(max_length=case["seq_len"] + NEW_TOKENS, top_k=1, end_token_ids=[])
        stream = chat_turn(bundle.model, processor, image, query, case.get("history", []), config)
        list(stream)
        assert stream.token_ids == golden[f"{name}.gen_ids"].tolist(), name


def test_cli_demo_answers_from_hf_directory(golden, tokenizers, monkeypatch, capsys):
    import io
    import sys

    import cli_demo

    case = golden.case("chat")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{golden.image_path}\n{case['query']}\nstop\n"))
    rc = cli_demo.main(["--from_pretrained", HF_DIR, "--local_tokenizer", golden.tokenizer_dir, "--version", "chat",
                        "--top_k", "1", "--max_length", str(case["seq_len"] + NEW_TOKENS)])
    out = capsys.readouterr().out
    assert rc == 0
    expected = tokenizers["chat"].decode(golden["chat.gen_ids"].tolist(), skip_special_tokens=True)
    answers = [line.split("Model: ", 1)[1] for line in out.splitlines() if "Model: " in line]
    assert answers == [expected.replace("</s>", "").strip()]


# Malformed input -------------------------------------------------------------------------------

def write_hf(path, tensors, config=None):
    os.makedirs(path, exist_ok=True)
    json.dump(config or json.load(open(os.path.join(HF_DIR, "config.json"))), open(os.path.join(path, "config.json"), "w"))
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return str(path)


def load_hf(path):
    from models import CogVLMModel

    return CogVLMModel.from_pretrained(path, args=inference_args())


def test_missing_shard_is_named(tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(HF_SHARDED_DIR, broken)
    os.remove(os.path.join(broken, "model-00002-of-00002.safetensors"))
    for attempt in (lambda: load_hf(broken), lambda: ckpt.convert_hf_to_sat(broken, str(tmp_path / "out"))):
        with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002.safetensors"):
            attempt()
    assert not os.path.exists(tmp_path / "out")


def test_truncated_file(tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(HF_DIR, broken)
    with open(os.path.join(broken, "model.safetensors"), "r+b") as f:
        f.truncate(1_000_000)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors .*corrupt or incomplete"):
        load_hf(broken)


def test_index_that_misplaces_a_tensor(tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(HF_SHARDED_DIR, broken)
    index_path = os.path.join(broken, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match="places lm_head.weight in model-00001-of-00002.safetensors"):
        load_hf(broken)


def test_wrong_shape_is_named(tmp_path):
    tensors = hf_tensors(HF_DIR)
    tensors["model.layers.1.mlp.vision_mlp.up_proj.weight"] = torch.zeros(171, 64)
    path = write_hf(tmp_path / "hf", tensors)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.vision_mlp.up_proj.weight has shape \(171, 64\) "
                                              r"but the config asks for \(172, 64\)"):
        load_hf(path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    config = json.load(open(os.path.join(HF_DIR, "config.json")))
    config["intermediate_size"] = 180
    path = write_hf(tmp_path / "hf", hf_tensors(HF_DIR), config=config)
    # whichever inner-size tensor is checked first (LLM MLP or adapter) is named
    with pytest.raises(CheckpointError, match=r"has shape \((172, 64|64, 172)\) but the config asks for "
                                              r"\((180, 64|64, 180)\)"):
        ckpt.convert_hf_to_sat(path, str(tmp_path / "sat"))


def test_unknown_and_missing_tensors_are_named(tmp_path):
    tensors = hf_tensors(HF_DIR)
    del tensors["model.vision.eoi"]
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    path = write_hf(tmp_path / "hf", tensors)
    with pytest.raises(CheckpointError, match="unknown tensors: model.layers.0.self_attn.extra.weight; "
                                              "missing tensors: model.vision.eoi"):
        load_hf(path)


def test_malformed_config(tmp_path):
    config = json.load(open(os.path.join(HF_DIR, "config.json")))
    del config["vision_config"]
    path = write_hf(tmp_path / "no-vision", hf_tensors(HF_DIR), config=config)
    with pytest.raises(CheckpointError, match="not a CogVLM config: field 'vision_config' is missing"):
        load_hf(path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
        HFFiles(path)


def test_lora_checkpoint_is_refused_until_merged(golden, tmp_path):
    from models import FineTuneTestCogVLMModel

    model, _ = FineTuneTestCogVLMModel.from_pretrained(golden.checkpoint, args=inference_args(),
                                                       overwrite_args={"use_lora": True, "lora_rank": 4})
    prefix = "lora.state_dict."
    model.load_state_dict({k[len(prefix):]: v for k, v in golden.tensors.items() if k.startswith(prefix)}, strict=False)
    config = CogVLMConfig.from_sat_dict(json.load(open(os.path.join(golden.checkpoint, "model_config.json"))))
    lora_dir, merged_dir, out = str(tmp_path / "lora"), str(tmp_path / "merged"), str(tmp_path / "hf")
    write_sat_checkpoint(lora_dir, config, [model.state_dict()])
    with pytest.raises(CheckpointError, match="unmerged LoRA weights.*merge them into the base weights first"):
        ckpt.convert_sat_to_hf(lora_dir, out)
    assert not os.path.exists(out)
    model.merge_lora()
    write_sat_checkpoint(merged_dir, config, [model.state_dict()])
    ckpt.convert_sat_to_hf(merged_dir, out)
    qkv = hf_tensors(out)["model.layers.0.self_attn.language_expert_query_key_value.weight"]
    assert torch.equal(qkv, model.state_dict()["transformer.layers.0.attention.query_key_value.weight"])
    assert not torch.equal(qkv, hf_tensors(HF_DIR)["model.layers.0.self_attn.language_expert_query_key_value.weight"])


def test_convert_script(golden, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  os.path.join(ROOT, "scripts", "convert_checkpoint.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / "hf")
    assert script.main([golden.checkpoint, out, "--max_shard_size", "1MB", "--tokenizer", golden.tokenizer_dir]) == 0
    assert "wrote HF checkpoint" in capsys.readouterr().out
    assert_same_tensors(hf_tensors(out), hf_tensors(HF_DIR))
    # ready for transformers alone: our modeling code with its auto_map, and the tokenizer
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cogvlm.CogVLMForCausalLM"
    for name in ("modeling_cogvlm.py", "configuration_cogvlm.py", "generation_config.json", "tokenizer.model"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert script.main([golden.checkpoint, str(tmp_path / "x"), "--tokenizer", str(tmp_path)]) == 1
    assert "has no tokenizer.model or tokenizer.json" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    assert script.main([out, str(tmp_path / "sat")]) == 0
    assert "wrote SAT checkpoint" in capsys.readouterr().out
    assert_same_tensors(sat_state(str(tmp_path / "sat")), sat_state(golden.checkpoint))
    assert script.main([out, str(tmp_path / "sat")]) == 1  # refuses to write into a non-empty directory
    assert capsys.readouterr().err.startswith("error: output directory")  # checked before any reading
    assert script.main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "error: checkpoint directory" in capsys.readouterr().err


def test_each_shard_is_unmapped_once_its_tensors_are_read():
    files = HFFiles(HF_SHARDED_DIR)
    by_shard = {}
    for key, name in files.weight_map.items():
        by_shard.setdefault(name, []).append(key)
    (first, first_keys), (second, _) = sorted(by_shard.items())
    for key in first_keys[:-1]:
        files.tensor(key)
    assert set(files._files) == {first, second}
    files.tensor(first_keys[-1])
    assert set(files._files) == {second}  # its mapping is gone: its pages no longer count in this process
    again = files.tensor(first_keys[0])  # mapped again when asked once more
    assert torch.equal(again, load_file(os.path.join(HF_SHARDED_DIR, first))[first_keys[0]])


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("RssFile:")[1].split()[0]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux: /proc/self/maps names file mappings")
def test_consumed_tensors_give_back_their_file_pages(tmp_path):
    path = str(tmp_path / "big.safetensors")
    save_file({"a": torch.randn(2048, 2048), "b": torch.randn(2048, 2048)}, path)  # 16 MB each
    handle = safe_open(path, framework="pt")
    mapped, in_memory = handle.get_tensor("a"), torch.randn(512, 512)
    expected, kept = mapped.clone(), in_memory.clone()
    float(mapped.sum())  # reads its pages: they count in this process's RSS
    before = _rss_file_bytes()
    nbytes = mapped.numel() * 4
    assert nbytes - 2 * 4096 <= release_consumed([mapped, in_memory]) <= nbytes  # its whole pages, only its
    assert nbytes - 3 * 4096 <= release_consumed([mapped[:, :7]]) <= nbytes  # a strided view: up to its last element
    assert before - _rss_file_bytes() >= 12 * 2**20
    assert torch.equal(mapped, expected)  # a later read comes from the file
    assert torch.equal(in_memory, kept)  # anonymous memory is not advised away


def test_loading_gives_back_the_file_pages_of_each_group(monkeypatch):
    seen = []
    monkeypatch.setattr(loader, "release_consumed", lambda tensors: seen.append(list(tensors)))
    model, _ = ckpt.load_model(HF_SHARDED_DIR)
    keys = set(HFFiles(HF_SHARDED_DIR).keys())
    assert seen and sum(len(group) for group in seen) >= len(keys) - 1  # every tensor read was handed back
