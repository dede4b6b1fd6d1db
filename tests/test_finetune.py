"""Finetuning: LoRA / P-tuning steps lower the loss (captchas and JSONL conversations), merged LoRA ==
unmerged (the visual-expert LoRA too), --freeze_vit, activation checkpointing, a killed run resumes
with its step count, optimizer state and lr schedule, finetune_demo.py on JSONL data, and QLoRA on
CPU is a clear error."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import GOLDEN_DIR, ROOT, assert_close_rel, randomize_, tiny_args
from models.cogvlm_model import FineTuneTrainCogVLMModel
from scripts.make_captcha_dataset import make_dataset
from utils.dataset import (CaptchaDataset, ConversationDataset, collate_samples,
                           llama2_text_processor, read_jsonl)
from utils import training
from utils.vision import get_image_processor

TOKENIZER = os.path.join(GOLDEN_DIR, "tokenizer")
SHIPPED = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-captcha")


def finetune_args(**flags):
    args = tiny_args(mode="finetune", hidden_dropout=0.0, attention_dropout=0.0)
    defaults = dict(use_lora=False, use_ptuning=False, use_qlora=False, lora_rank=4, layer_range=None, pre_seq_len=4,
                    full_finetune=False, vit_mlp_layers=[46, 54], lora_experts="language", freeze_vit=False)
    for name, value in {**defaults, **flags}.items():
        setattr(args, name, value)
    return args


@pytest.fixture(scope="module")
def captcha_batch(tmp_path_factory, tokenizers):
    folder = tmp_path_factory.mktemp("captchas")
    make_dataset(str(folder), 8, "clean", seed=11)
    processor = llama2_text_processor(tokenizers["base"], 64, image_length=9)
    dataset = CaptchaDataset(str(folder), get_image_processor(42), processor)
    return collate_samples([dataset[i] for i in range(len(dataset))])


def loss_of(model, batch):
    return training.next_token_loss(model(**training.model_inputs(batch))[0], batch["labels"])


@pytest.mark.parametrize("method", ["use_lora", "use_ptuning"])
def test_a_few_steps_lower_the_loss_and_train_only_the_adapters(method, captcha_batch):
    torch.manual_seed(0)
    args = finetune_args(**{method: True})
    model = randomize_(FineTuneTrainCogVLMModel(args), seed=3)
    if method == "use_lora":  # B starts at zero; make the adapters start from a non-trivial point too
        assert any("matrix_B" in n for n, _ in model.named_parameters())
    trainable = training.select_trainable_parameters(model, args)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    marker = "matrix_" if method == "use_lora" else "ptuning"
    assert names and all(marker in n for n in names)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "use_lora":
        assert any(".vit_model." in n for n in names) and any(n.startswith("transformer.layers.") for n in names)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = loss_of(model, captcha_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"{name} is frozen but changed"


@torch.no_grad()
def test_merged_lora_model_equals_unmerged(captcha_batch):
    args = finetune_args(use_lora=True)
    model = randomize_(FineTuneTrainCogVLMModel(args), seed=5).eval()  # non-zero A and B everywhere
    inputs = training.model_inputs(captcha_batch)
    unmerged = model(**inputs)[0]
    model.merge_lora()
    assert not any("matrix_" in n for n, _ in model.named_parameters())
    merged = model(**inputs)[0]
    assert_close_rel(merged, unmerged, rel=1e-4, what="merged vs unmerged LoRA logits")
    plain = randomize_(FineTuneTrainCogVLMModel(finetune_args()), seed=5).eval()
    assert (plain(**inputs)[0] - unmerged).abs().max() > 1e-3  # the LoRA weights did matter


def run_finetune(*extra, cwd=ROOT):
    return subprocess.run([sys.executable, "finetune_demo.py", *extra], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_training_resumes_with_its_step_and_optimizer_state(tmp_path, tiny_checkpoint):
    data = tmp_path / "train"
    make_dataset(str(data), 4, "clean", seed=3)
    config = json.load(open(os.path.join(ROOT, "scripts", "ds_config_cpu.json")))
    config["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(config))
    command = ["--from_pretrained", tiny_checkpoint, "--full_finetune", "--local_tokenizer", TOKENIZER,
               "--version", "base", "--max_length", "64", "--mode", "pretrain", "--train-iters", "4", "--lr", "1e-3",
               "--warmup", "0.5", "--lr-decay-style", "cosine",
               "--train-data", str(data), "--split", "1.", "--deepspeed_config", str(tmp_path / "ds.json"),
               "--num-workers", "0", "--log-interval", "1", "--save", str(tmp_path / "runs"), "--save-interval", "2",
               "--experiment-name", "resume", "--final_save", str(tmp_path / "final"), "--seed", "1",
               "--summary-dir", str(tmp_path / "summary")]
    first = run_finetune(*command, "--exit-interval", "2")  # stops right after the step-2 checkpoint, as a kill would
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "latest").read_text().strip() == "2"
    assert not (tmp_path / "final").exists()

    second = run_finetune(*command)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"resumed {run_dir} at iteration 2" in log
    assert "iteration        3/       4" in log and "iteration        1/       4" not in log
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run_dir.name]  # same run folder
    assert (run_dir / "latest").read_text().strip() == "4"
    state = torch.load(run_dir / "4" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {4}, adam_steps  # 2 before the kill + 2 after: the moments were restored
    assert (tmp_path / "final" / "latest").is_file()
    # the lr schedule continues where it stopped (SAT's own resume would re-warm up from 5%)
    logged = dict(re.findall(r"iteration\s+(\d+)/\s+4 \| .*?learning rate ([0-9.E+-]+)", first.stdout + first.stderr + log))
    assert logged == {str(i): f"{lr:.3E}" for i, lr in enumerate(expected_lrs(1e-3, warmup_iters=2, iters=4), 1)}


def expected_lrs(lr, warmup_iters, iters):
    """The lr SAT logs after each of `iters` steps of an uninterrupted run (pretrain mode, cosine)."""
    from sat.training.learning_rates import AnnealingLR

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = AnnealingLR(optimizer, start_lr=lr, warmup_iter=warmup_iters, num_iters=iters, decay_style="cosine",
                           last_iter=0, decay_ratio=0.1, auto_warmup_steps=0)
    lrs = []
    for _ in range(iters):
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error; with CUDA QLoRA would start training")
def test_qlora_on_cpu_is_a_clear_error(capsys):
    import finetune_demo

    assert finetune_demo.main(["--use_qlora", "--from_pretrained", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --use_qlora needs a CUDA GPU") and "--use_lora" in err


def test_shipped_model_reads_unseen_captchas(tmp_path):
    import evaluate_demo

    data = tmp_path / "unseen"
    make_dataset(str(data), 50, "clean", seed=424242)  # training used seed 0
    output = tmp_path / "eval.json"
    code = evaluate_demo.main(["--from_pretrained", SHIPPED, "--local_tokenizer", os.path.join(SHIPPED, "tokenizer"),
                               "--version", "base", "--max_length", "96", "--device", "cpu", "--data", str(data),
                               "--output", str(output)])
    assert code == 0
    results = json.loads(output.read_text())
    assert results["count"] == 50 and len(results["predictions"]) == 50
    assert {p["label"] for p in results["predictions"]} == {n[:-4] for n in os.listdir(data)}
    assert results["acc"] >= 0.85, results["acc"]


def test_tiny_captcha_tokenizer_reads_one_character_per_token(tmp_path):
    from scripts.make_char_tokenizer import make_char_tokenizer
    from utils.language import llama2_tokenizer

    shipped = llama2_tokenizer(os.path.join(ROOT, "scripts", "tiny_captcha", "tokenizer"), "base")
    make_char_tokenizer(str(tmp_path / "tok"))
    made = llama2_tokenizer(str(tmp_path / "tok"), "base")
    config = json.load(open(os.path.join(ROOT, "scripts", "tiny_captcha", "model_config.json")))
    assert len(shipped) == len(made) <= config["vocab_size"]
    for label in ("z9tixx", "a2gm1", "es2v"):
        ids = shipped.encode(label, add_special_tokens=False)
        assert shipped.convert_ids_to_tokens(ids) == ["▁", *label]  # the k-th answer token is the k-th glyph
        assert ids == made.encode(label, add_special_tokens=False)
    text = "Question: Wie heißt das? 3bnyf [[12,34,56,78]]"
    assert shipped.decode(shipped.encode(text), skip_special_tokens=True) == text  # bytes cover the rest


# JSONL conversations, the visual-expert LoRA, lean-memory options ----------------------------

@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    from scripts.make_scene_dataset import make_scene_dataset

    folder = tmp_path_factory.mktemp("scenes")
    return (make_scene_dataset(str(folder / "train"), 8, seed=21, progress=False),
            make_scene_dataset(str(folder / "valid"), 4, seed=22, progress=False))


@pytest.fixture(scope="module")
def scene_batch(scene_data, tokenizers):
    builder = llama2_text_processor(tokenizers["chat"], 300, image_length=9)
    dataset = ConversationDataset(read_jsonl(scene_data[0]), get_image_processor(42), builder, source="train")
    return collate_samples([dataset[i] for i in range(len(dataset))])


def _train_steps(model, batch, steps=8, lr=3e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_of(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("experts", ["vision", "both"])
def test_lora_steps_on_jsonl_conversations_lower_the_loss(experts, scene_batch):
    torch.manual_seed(0)
    args = finetune_args(use_lora=True, lora_experts=experts)
    model = randomize_(FineTuneTrainCogVLMModel(args), seed=3)
    training.select_trainable_parameters(model, args)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    vision_expert = [n for n in names if n.startswith("mixins.rotary.vision_")]
    language_expert = [n for n in names if n.startswith("transformer.layers.")]
    assert vision_expert and all("matrix_" in n for n in names)
    assert bool(language_expert) == (experts == "both")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train_steps(model, scene_batch)
    assert losses[-1] < losses[0] - 0.1, losses
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"{name} is frozen but changed"


@torch.no_grad()
def test_merged_vision_expert_lora_equals_unmerged(scene_batch):
    model = randomize_(FineTuneTrainCogVLMModel(finetune_args(use_lora=True, lora_experts="both")), seed=5).eval()
    inputs = training.model_inputs(scene_batch)
    unmerged = model(**inputs)[0]
    model.merge_lora()
    state = model.state_dict()
    assert not any("matrix_" in k or ".original." in k for k in state)
    assert "mixins.rotary.vision_query_key_value_list.0.weight" in state
    assert_close_rel(model(**inputs)[0], unmerged, rel=1e-4, what="merged vs unmerged visual-expert LoRA logits")
    plain = randomize_(FineTuneTrainCogVLMModel(finetune_args(use_lora=True, lora_experts="language")), seed=5).eval()
    plain.merge_lora()
    assert (plain(**inputs)[0] - unmerged).abs().max() > 1e-3  # the visual-expert LoRA weights did matter


def test_freeze_vit_trains_no_vit_parameter():
    args = finetune_args(use_lora=True, vit_mlp_layers=[0, 0], freeze_vit=True)
    model = FineTuneTrainCogVLMModel(args)
    training.select_trainable_parameters(model, args)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".vit_model." in n for n in trainable)
    args.freeze_vit = False
    training.select_trainable_parameters(model, args)
    assert any(".vit_model." in n for n, p in model.named_parameters() if p.requires_grad)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(scene_batch):
    results = []
    for checkpointing in (False, True):
        args = finetune_args(use_lora=True, lora_experts="both", checkpoint_activations=checkpointing,
                             checkpoint_num_layers=1)
        model = randomize_(FineTuneTrainCogVLMModel(args), seed=3).train()
        training.select_trainable_parameters(model, args)
        torch.manual_seed(0)  # the same dropout masks in both runs (the tiny config's ViT has dropout)
        loss = loss_of(model, scene_batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    assert loss_plain == pytest.approx(loss_checkpointed, rel=1e-6)
    assert grads_plain.keys() == grads_checkpointed.keys()
    for name, grad in grads_plain.items():
        assert_close_rel(grads_checkpointed[name], grad, rel=1e-5, what=name)


def test_finetune_demo_on_jsonl_with_lean_memory_options(tmp_path, tiny_checkpoint, scene_data):
    config = json.load(open(os.path.join(ROOT, "scripts", "ds_config_cpu.json")))
    config["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(config))
    train, valid = scene_data
    result = run_finetune(
        "--from_pretrained", tiny_checkpoint, "--use_lora", "--lora_rank", "4", "--lora_experts", "both",
        "--freeze_vit", "--checkpoint-activations", "--local_tokenizer", TOKENIZER, "--version", "chat",
        "--max_length", "300", "--mode", "pretrain", "--train-iters", "4", "--lr", "1e-3", "--train_data", train,
        "--valid_data", valid, "--eval-interval", "4", "--eval-iters", "1", "--eval-batch-size", "4",
        "--eval_max_new_tokens", "4", "--split", "1.", "--deepspeed_config", str(tmp_path / "ds.json"),
        "--num-workers", "0", "--log-interval", "2", "--save", str(tmp_path / "runs"), "--save-interval", "4",
        "--experiment-name", "jsonl", "--final_save", str(tmp_path / "final"), "--seed", "1",
        "--summary-dir", str(tmp_path / "summary"))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    trainable = int(re.search(r"Total trainable parameters: (\d+)", log).group(1))
    assert trainable > 0 and re.search(r"peak memory: \d+ MiB \(peak RSS\)", log)
    assert re.search(r"acc_w/o_case", log) and re.search(r" score ", log)
    final = json.load(open(tmp_path / "final" / "model_config.json"))
    assert final["template_version"] == "chat" and final["grounding"] is True  # the scenes have box answers
    assert not final.get("use_lora")


def test_answer_loss_equals_the_full_logits_loss_and_its_gradients(scene_batch):
    # eval(): the tiny config's ViT has dropout; gradients flow all the same
    model = randomize_(FineTuneTrainCogVLMModel(finetune_args(full_finetune=True)), seed=4).eval()
    full = loss_of(model, scene_batch)
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    training.ensure_answer_logits(model)
    answers_only = training.answer_loss(model, scene_batch)
    answers_only.backward()
    assert answers_only.item() == pytest.approx(full.item(), rel=1e-6)
    for name, grad in expected.items():
        assert_close_rel(dict(model.named_parameters())[name].grad, grad, rel=1e-5, what=name)
