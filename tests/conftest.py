"""Shared fixtures: the golden bundle, the model loaded from it once, and a second tiny config."""
import argparse
import contextlib
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden", "tiny-small")
IMAGE_CASES = ["base", "chat", "chat_hist", "vqa"]
ALL_CASES = IMAGE_CASES + ["text_only"]


def inference_args(**extra):
    return argparse.Namespace(deepspeed=None, local_rank=0, rank=0, world_size=1, model_parallel_size=1,
                              mode="inference", skip_init=True, use_gpu_initialization=False, device="cpu",
                              bf16=False, fp16=False, **extra)


def assert_close_rel(actual, expected, rel=1e-4, what=""):
    """The bundle's tolerance: max|actual - expected| <= rel * max|expected|."""
    actual = actual.detach().float()
    expected = expected.float()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    bound = rel * expected.abs().max().item()
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"
    return diff


class Golden:
    def __init__(self, path):
        from safetensors.torch import load_file

        self.dir = path
        self.meta = json.load(open(os.path.join(path, "golden.json")))
        self.tensors = load_file(os.path.join(path, "golden.safetensors"))
        self.checkpoint = os.path.join(path, "checkpoint")
        self.tokenizer_dir = os.path.join(path, "tokenizer")
        self.image_path = os.path.join(path, "image.png")

    def __getitem__(self, name):
        return self.tensors[name]

    def case(self, name):
        return self.meta["cases"][name]


@pytest.fixture(scope="session")
def golden():
    return Golden(GOLDEN_DIR)


@pytest.fixture(scope="session")
def golden_model(golden):
    from models import CogVLMModel

    model, model_args = CogVLMModel.from_pretrained(golden.checkpoint, args=inference_args())
    return model.eval(), model_args


@pytest.fixture(scope="session")
def tokenizers(golden):
    from utils.language import llama2_tokenizer

    return {sig: llama2_tokenizer(golden.tokenizer_dir, sig) for sig in ("base", "chat", "vqa")}


def tiny_args(**overrides):
    """A second tiny CogVLM config: other depth, head count, widths and image size than the bundle."""
    from models import CogVLMModel

    config = dict(num_layers=3, hidden_size=48, num_attention_heads=6, vocab_size=1000, inner_hidden_size=96,
                  layernorm_order="pre", use_bias=False, max_sequence_length=512, image_length=9,
                  eva_args=dict(model_class="EVA2CLIPModel", num_layers=1, hidden_size=32, num_attention_heads=2,
                                vocab_size=1, layernorm_order="post", model_parallel_size=1, max_sequence_length=10,
                                inner_hidden_size=40, use_final_layernorm=False, layernorm_epsilon=1e-6,
                                image_size=[42, 42], pre_len=1, post_len=0, in_channels=3, patch_size=14),
                  model_parallel_size=1, skip_init=False, mode="inference", device="cpu", fp16=False, bf16=False,
                  use_gpu_initialization=False, deepspeed=None)
    config.update(overrides)
    return CogVLMModel.get_args(**config)


def randomize_(model, seed=0):
    """Give every weight a scale that makes logits depend on inputs (SAT's init std is tiny)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
            elif "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if param.numel() > 1 and "bias" not in name else 0.02))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised second-config CogVLM saved as a SAT checkpoint (with SAT's own writer)."""
    from sat.training.model_io import save_checkpoint
    from models import CogVLMModel

    args = tiny_args()
    model = randomize_(CogVLMModel(args), seed=7).eval()
    path = str(tmp_path_factory.mktemp("tiny-ckpt"))
    args.save = path
    save_checkpoint(1, model, None, None, args)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command, ready_url, log_path, env=None, timeout_s=180):
    """Run a server `command` (cwd = repo root, output to `log_path`) and yield once `ready_url`
    answers 2xx; the server is stopped on exit. Fails the test if it exits or never answers."""
    import subprocess
    import time
    import urllib.request

    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{command[1]} exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
            try:
                urllib.request.urlopen(ready_url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{command[1]} did not serve within {timeout_s} s:\n{open(log_path).read()[-3000:]}")
                time.sleep(0.25)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat_turn(model, text_processor, image_path, query, history=(), config=None, image_size=56):
    """A chat-core turn (utils.chat.ChatStream) from upstream-style parts: a text processor (whose tokenizer's
    signal_type is the template), an image path or None, the history."""
    from utils.chat import ChatStream
    from utils.conversation import Conversation
    from utils.processor import CogVLMProcessor
    from utils.vision import load_image

    processor = CogVLMProcessor(text_processor.tokenizer, image_size, text_processor.image_length,
                                text_processor.max_target_length)
    conversation = Conversation(text_processor.signal_type, load_image(image_path) if image_path else None,
                                [tuple(turn) for turn in history])
    return ChatStream(model, processor, conversation, query, config)
