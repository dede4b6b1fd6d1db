"""Our own CogVLM for 🤗 transformers (models/hf_cogvlm) on the golden bundle's weights in HF layout.

The seed README's snippet runs in a fresh interpreter outside the repository, so the model comes from
the remote-code files that `add_remote_code` put into the checkpoint directory; the other tests use the
classes registered in-process by `import models.hf_cogvlm`.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, LlamaTokenizer
from transformers.generation.streamers import BaseStreamer

from conftest import ALL_CASES, IMAGE_CASES, ROOT, assert_close_rel
from models.checkpoint import convert_sat_to_hf, load_model
from models.errors import CheckpointError, TokenizerError
from models.hf_cogvlm import AUTO_MAP, REMOTE_CODE_FILES, CogVLMForCausalLM, add_remote_code
from models.hf_cogvlm.processing_cogvlm import build_conversation_input_ids, cogvlm_position_ids
from scripts.make_captcha_dataset import render_captcha
from utils.language import llama2_text_processor_inference

HF_DIR = os.path.join(ROOT, "tests", "golden", "tiny-small-hf")
HF_SHARDED_DIR = os.path.join(ROOT, "tests", "golden", "tiny-small-hf-sharded")
NEW_TOKENS = 16

# The README's "🤗 Transformers" snippet; only paths, device, dtype, the conversation of each golden case
# and (for all but the chat case) max_length differ. The full-forward logits are taken on the same inputs.
SNIPPET = r'''
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoProcessor, LlamaTokenizer

MODEL, IMAGE, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
CASES = json.loads(sys.argv[4])
results = {}

tokenizer = LlamaTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(
    MODEL,
    dtype=torch.float32,
    low_cpu_mem_usage=True,
    trust_remote_code=True
).to('cpu').eval()

for name, case in CASES.items():
    query = case['query']
    image = Image.open(IMAGE).convert('RGB')
    images = [] if name == 'text_only' else [image]
    inputs = model.build_conversation_input_ids(tokenizer, query=query, history=case['history'], images=images,
                                                template_version=case['template'])
    inputs = {
        'input_ids': inputs['input_ids'].unsqueeze(0).to('cpu'),
        'token_type_ids': inputs['token_type_ids'].unsqueeze(0).to('cpu'),
        'attention_mask': inputs['attention_mask'].unsqueeze(0).to('cpu'),
        **({'images': [[inputs['images'][0].to('cpu').to(torch.float32)]]} if images else {}),
    }
    gen_kwargs = {"max_length": case['max_length'], "do_sample": False}

    with torch.no_grad():
        outputs = model.generate(**inputs, **gen_kwargs)
        outputs = outputs[:, inputs['input_ids'].shape[1]:]
        print(tokenizer.decode(outputs[0]))
        logits = model(**inputs).logits[0]
    results.update({f'{name}.input_ids': inputs['input_ids'][0], f'{name}.token_type_ids': inputs['token_type_ids'][0],
                    f'{name}.logits': logits, f'{name}.tokens': outputs[0].contiguous()})

processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)
batch = processor(images=Image.open(IMAGE), text=CASES['chat']['query'], return_tensors='pt')
results.update({f'processor.{key}': value for key, value in batch.items()})
save_file(results, OUT)
print('MODEL CLASS', type(model).__module__, type(processor).__module__)
'''


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def case_conversation(golden, name):
    """(query, history, template version) of a golden case."""
    case = golden.case(name)
    if name == "text_only":
        return "Hello, who are you?", [], "chat"
    return case["query"], [tuple(turn) for turn in case["history"]], case.get("signal_type", "chat")


@pytest.fixture(scope="module")
def hf_dir(golden, tmp_path_factory):
    """tests/golden/tiny-small-hf with the remote code, generation config and tokenizer added."""
    path = str(tmp_path_factory.mktemp("hf") / "cogvlm-tiny-hf")
    shutil.copytree(HF_DIR, path)
    add_remote_code(path, template="chat", tokenizer_dir=golden.tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return LlamaTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def image(golden):
    return Image.open(golden.image_path).convert("RGB")


@pytest.fixture(scope="module")
def snippet(golden, hf_dir, tmp_path_factory):
    """Run the seed snippet in a fresh interpreter whose working directory is outside the repository."""
    work = tmp_path_factory.mktemp("snippet")
    cases = {}
    for name in ALL_CASES:
        query, history, template = case_conversation(golden, name)
        max_length = 2048 if name == "chat" else golden.case(name)["seq_len"] + NEW_TOKENS  # chat: as the seed
        cases[name] = dict(query=query, history=history, template=template, max_length=max_length)
    out = str(work / "results.safetensors")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SNIPPET, hf_dir, golden.image_path, out, json.dumps(cases)],
                          cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecated" not in proc.stderr, proc.stderr[-3000:]  # the README's snippet runs without warnings
    assert "MODEL CLASS transformers_modules." in proc.stdout  # the checkpoint's own files, not this repository
    return load_file(out)


def test_add_remote_code_writes_a_self_contained_directory(hf_dir):
    config = read_json(os.path.join(hf_dir, "config.json"))
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "cogvlm" and config["template_version"] == "chat"
    assert read_json(os.path.join(hf_dir, "generation_config.json"))["eos_token_id"] == 2
    for name in REMOTE_CODE_FILES + ("tokenizer.model", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(hf_dir, name)), name
    for name in REMOTE_CODE_FILES:  # remote code may import only torch, transformers, PIL, numpy, stdlib, siblings
        with open(os.path.join(hf_dir, name)) as f:
            source = f.read()
        imports = {line.split()[1].split(".")[0] for line in source.splitlines()
                   if line.startswith(("import ", "from ")) and not line.startswith("from .")}
        allowed = {"json", "os", "shutil", "struct", "typing", "numpy", "torch", "PIL", "transformers"}
        assert imports <= allowed, (name, imports)
    assert not [n for n in os.listdir(hf_dir) if n.startswith(".")]  # no temporary file left behind


def test_add_remote_code_errors(tmp_path, golden):
    with pytest.raises(CheckpointError, match="has no config.json"):
        add_remote_code(str(tmp_path))
    shutil.copy(os.path.join(HF_DIR, "config.json"), tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        add_remote_code(str(tmp_path), tokenizer_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="unknown template version"):
        add_remote_code(str(tmp_path), template="caption")


def test_converter_output_is_the_snippet_directory(golden, hf_dir, tmp_path):
    """SAT -> HF conversion with add_remote_code as its extra files gives the directory the snippet runs on."""
    out = str(tmp_path / "converted")
    convert_sat_to_hf(golden.checkpoint, out,
                      extra_files=lambda tmp: add_remote_code(tmp, tokenizer_dir=golden.tokenizer_dir))
    assert set(os.listdir(out)) == set(os.listdir(hf_dir)) - {"README.md"}
    assert read_json(os.path.join(out, "config.json")) == read_json(os.path.join(hf_dir, "config.json"))
    for name in set(os.listdir(out)) - {"config.json", "model.safetensors"}:
        with open(os.path.join(out, name), "rb") as ours, open(os.path.join(hf_dir, name), "rb") as theirs:
            assert ours.read() == theirs.read(), name
    converted, reference = (load_file(os.path.join(d, "model.safetensors")) for d in (out, hf_dir))
    assert set(converted) == set(reference) and all(torch.equal(converted[k], reference[k]) for k in reference)


# The seed snippet (remote code, fresh interpreter) ------------------------------------------------

@pytest.mark.parametrize("name", ALL_CASES)
def test_seed_snippet_builds_the_golden_inputs(golden, snippet, name):
    assert torch.equal(snippet[f"{name}.input_ids"], golden[f"{name}.input_ids"])
    token_type_ids = snippet[f"{name}.token_type_ids"]
    expected_types = golden.tensors.get(f"{name}.image_embed_mask", torch.zeros_like(token_type_ids))
    assert torch.equal(token_type_ids, expected_types)
    assert torch.equal(cogvlm_position_ids(token_type_ids[None])[0], golden[f"{name}.position_ids"])


@pytest.mark.parametrize("name", ALL_CASES)
def test_seed_snippet_full_forward_logits(golden, snippet, name):
    assert_close_rel(snippet[f"{name}.logits"], golden[f"{name}.logits"], what=f"{name}.logits")


@pytest.mark.parametrize("name", ALL_CASES)
def test_seed_snippet_greedy_tokens(golden, snippet, name):
    tokens = snippet[f"{name}.tokens"].tolist()
    assert tokens[:NEW_TOKENS] == golden[f"{name}.gen_ids"].tolist()
    if name != "chat":
        assert len(tokens) == NEW_TOKENS


def test_seed_snippet_processor_matches_build_conversation_input_ids(golden, snippet):
    assert torch.equal(snippet["processor.input_ids"][0], golden["chat.input_ids"])
    assert torch.equal(snippet["processor.token_type_ids"][0], golden["chat.image_embed_mask"])
    assert torch.equal(snippet["processor.images"], golden["image"])


# In-process: loading, SAT equivalence, batching, generation modes ---------------------------------

@pytest.mark.parametrize("source", [HF_DIR, HF_SHARDED_DIR])
def test_loads_every_key_single_file_and_sharded(hf_model, source):
    model, info = CogVLMForCausalLM.from_pretrained(source, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert AutoConfig.from_pretrained(source).model_type == "cogvlm"  # registered in-process: no KeyError 'cogvlm'
    reference = hf_model.state_dict()
    assert set(model.state_dict()) == set(reference)
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())


@torch.no_grad()
def test_hf_model_equals_sat_model_on_a_new_conversation(golden, golden_model, hf_model, tokenizer, tokenizers,
                                                         image):
    """A conversation that is not in the bundle: same inputs, logits and greedy tokens as our SAT model."""
    sat_model, model_args = golden_model
    query, history = "How many squares are there?", [("Describe it.", "A red square.")]
    sample = hf_model.build_conversation_input_ids(tokenizer, query=query, history=history, images=[image])
    sat_processor = llama2_text_processor_inference(tokenizers["chat"], 300, model_args.image_length)
    sat_inputs = sat_processor(sat_processor.history_to_prompt(history, query))
    assert torch.equal(sample["input_ids"], sat_inputs["input_ids"][0])
    assert torch.equal(sample["token_type_ids"], sat_inputs["image_embed_mask"][0])
    assert torch.equal(cogvlm_position_ids(sample["token_type_ids"][None]), sat_inputs["position_ids"])

    prompt = sample["input_ids"][None]
    generated = hf_model.generate(input_ids=prompt, token_type_ids=sample["token_type_ids"][None],
                                  images=[sample["images"]], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    full = generated  # prompt + 12 greedy tokens, checked in one SAT forward (teacher forcing)
    length, new = full.shape[1], full.shape[1] - prompt.shape[1]
    pad = torch.zeros(1, new, dtype=torch.long)
    positions = torch.cat([sat_inputs["position_ids"], sat_inputs["position_ids"][:, -1:] + 1 + torch.arange(new)], 1)
    causal = torch.ones(1, 1, length, length).tril()
    sat_logits = sat_model(input_ids=full, position_ids=positions, attention_mask=causal,
                           vision_expert_mask=torch.cat([sat_inputs["vision_expert_mask"], pad], 1),
                           image_embed_mask=torch.cat([sat_inputs["image_embed_mask"], pad], 1),
                           images=sample["images"][0][None])[0][0]
    token_types = torch.cat([sample["token_type_ids"][None], pad], 1)
    hf_logits = hf_model(input_ids=full, token_type_ids=token_types, images=[sample["images"]]).logits[0]
    assert_close_rel(hf_logits, sat_logits, what="HF vs SAT logits")
    assert sat_logits[prompt.shape[1] - 1:-1].argmax(-1).tolist() == generated[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def test_second_config_equals_sat_model(tiny_checkpoint, tokenizer, tmp_path):
    """Another shape (3 layers, hidden 48, 6 heads, 42 px images, 9 patches), converted by our converter."""
    sat_model, _ = load_model(tiny_checkpoint)
    out = str(tmp_path / "tiny-hf")
    convert_sat_to_hf(tiny_checkpoint, out, extra_files=add_remote_code)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    image = render_captcha("ab12", "clean", random.Random(0))
    sample = model.build_conversation_input_ids(tokenizer, query="What does it say?", images=[image])
    assert int(sample["token_type_ids"].sum()) == 9 + 2 and sample["images"][0].shape == (3, 42, 42)
    prompt, token_types = sample["input_ids"][None], sample["token_type_ids"][None]
    generated = model.generate(input_ids=prompt, token_type_ids=token_types, images=[sample["images"]],
                               max_new_tokens=8, min_new_tokens=8, do_sample=False)
    token_types = torch.cat([token_types, torch.zeros(1, 8, dtype=torch.long)], 1)
    vision_expert_mask = token_types.clone()
    vision_expert_mask[:, :-1] &= token_types[:, 1:]
    vision_expert_mask[:, -1] = 0
    length = generated.shape[1]
    sat_logits = sat_model(input_ids=generated, position_ids=cogvlm_position_ids(token_types),
                           attention_mask=torch.ones(1, 1, length, length).tril(),
                           vision_expert_mask=vision_expert_mask, image_embed_mask=token_types,
                           images=sample["images"][0][None])[0][0]
    hf_logits = model(input_ids=generated, token_type_ids=token_types, images=[sample["images"]]).logits[0]
    assert_close_rel(hf_logits, sat_logits, what="second config: HF vs SAT logits")
    assert sat_logits[prompt.shape[1] - 1:-1].argmax(-1).tolist() == generated[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def test_bf16_on_cpu_tracks_fp32(hf_dir, golden):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    assert model.dtype == torch.bfloat16
    logits = model(input_ids=golden["chat.input_ids"][None], token_type_ids=golden["chat.image_embed_mask"][None],
                   images=golden["image"]).logits[0].float()
    expected = golden["chat.logits"]
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@torch.no_grad()
def test_left_padded_batch_equals_one_by_one(hf_dir, hf_model, image, tmp_path):
    AutoProcessor.from_pretrained(hf_dir).save_pretrained(str(tmp_path / "processor"))
    processor = AutoProcessor.from_pretrained(str(tmp_path / "processor"))  # a saved processor reloads alone
    flipped = image.transpose(Image.FLIP_LEFT_RIGHT)
    images = [image, None, flipped]
    texts = ["What color is the square?", "Hello, who are you?", "Where is it?"]
    histories = [[("Describe it.", "A red square on a gradient.")], None, []]
    batch = processor(images=images, text=texts, history=histories, return_tensors="pt")
    assert batch["images"].shape[0] == 2 and (batch["attention_mask"][:, 0] == 0).any()  # left padding
    batch_out = hf_model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    batch_logits = hf_model(**batch).logits[:, -1]
    for row, (single_image, text, history) in enumerate(zip(images, texts, histories)):
        single = processor(images=single_image, text=text, history=history)
        single_out = hf_model.generate(**single, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert batch_out[row, -8:].tolist() == single_out[0, -8:].tolist(), row
        assert_close_rel(batch_logits[row], hf_model(**single).logits[0, -1], what=f"row {row}")


class TokenRecorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


@torch.no_grad()
def test_generation_modes(golden, hf_model, hf_dir, image):
    """Sampling, beam search, streamers and use_cache=False agree with what they must equal."""
    inputs = AutoProcessor.from_pretrained(hf_dir)(images=image, text=golden.case("chat")["query"])
    greedy = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert greedy[0, -NEW_TOKENS:].tolist() == golden["chat.gen_ids"].tolist()
    no_cache = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 use_cache=False)
    assert torch.equal(no_cache, greedy)
    assert torch.equal(hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=True, top_k=1), greedy)
    samples = []
    for _ in range(2):
        torch.manual_seed(3)
        samples.append(hf_model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=50, temperature=1.5))
    assert torch.equal(samples[0], samples[1])

    recorder = TokenRecorder()
    hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                      streamer=recorder)
    assert recorder.ended and sum(recorder.chunks[1:], []) == golden["chat.gen_ids"].tolist()

    beams = {}
    for kind, images in (("tensor", inputs["images"]), ("lists", [[inputs["images"][0]]])):
        beams[kind] = hf_model.generate(**{**inputs, "images": images}, num_beams=3, num_return_sequences=2,
                                        max_new_tokens=6, min_new_tokens=6, do_sample=False, length_penalty=0.0,
                                        output_scores=True, return_dict_in_generate=True)
    assert torch.equal(beams["tensor"].sequences, beams["lists"].sequences)
    prompt_length = inputs["input_ids"].shape[1]
    for sequence, score in zip(beams["tensor"].sequences, beams["tensor"].sequences_scores):
        # the beam score (sum of cached step log-probs) equals the log-prob of a full forward over the sequence
        token_types = torch.cat([inputs["token_type_ids"][0], torch.zeros(6, dtype=torch.long)])[None]
        log_probs = hf_model(input_ids=sequence[None], token_type_ids=token_types,
                             images=inputs["images"]).logits[0].log_softmax(-1)
        expected = log_probs[prompt_length - 1:-1].gather(-1, sequence[prompt_length:, None]).sum()
        assert abs(score.item() - expected.item()) < 1e-4


@torch.no_grad()
def test_manual_cache_continuation_and_eager_attention(golden, hf_dir, hf_model):
    """A forward that continues a cache without position_ids picks up the image-aware positions; eager = sdpa."""
    ids, token_types = golden["chat.input_ids"][None], golden["chat.image_embed_mask"][None]
    full_ids = torch.cat([ids, golden["chat.gen_ids"][None, :2]], 1)
    full_types = torch.cat([token_types, torch.zeros(1, 2, dtype=torch.long)], 1)
    full = hf_model(input_ids=full_ids, token_type_ids=full_types, images=golden["image"], use_cache=False).logits[0]
    prefill = hf_model(input_ids=ids, token_type_ids=token_types, images=golden["image"], use_cache=True)
    step = hf_model(input_ids=full_ids[:, -2:], cache=prefill.cache, use_cache=True).logits[0]
    assert_close_rel(step, full[-2:], what="cached continuation")
    eager = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    logits = eager(input_ids=ids, token_type_ids=token_types, images=golden["image"]).logits[0]
    assert_close_rel(logits, golden["chat.logits"], what="eager logits")


def test_save_pretrained_round_trip_is_bit_identical(hf_model, tmp_path, golden):
    for source_dir, model in (("single", hf_model), ("sharded", None)):
        if model is None:  # the 2-shard fixture with the remote code added
            shutil.copytree(HF_SHARDED_DIR, tmp_path / "sharded")
            add_remote_code(str(tmp_path / "sharded"))
            model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"), trust_remote_code=True).eval()
        out = str(tmp_path / f"saved-{source_dir}")
        model.save_pretrained(out)
        assert read_json(os.path.join(out, "config.json"))["auto_map"]["AutoModelForCausalLM"] == \
            AUTO_MAP["AutoModelForCausalLM"]
        assert {"modeling_cogvlm.py", "configuration_cogvlm.py"} <= set(os.listdir(out))
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        state, reference = reloaded.state_dict(), hf_model.state_dict()
        assert set(state) == set(reference)
        for key, value in state.items():
            assert value.dtype == reference[key].dtype and torch.equal(value, reference[key]), key
        inputs = dict(input_ids=golden["vqa.input_ids"][None], token_type_ids=golden["vqa.image_embed_mask"][None],
                      images=golden["image"])
        with torch.no_grad():
            assert torch.equal(reloaded(**inputs).logits, hf_model(**inputs).logits)


def test_device_map_auto_on_cpu(hf_dir, golden, tmp_path):
    """device_map="auto" (accelerate) loads and answers; with little memory some layers go to disk."""
    inputs = dict(input_ids=golden["chat.input_ids"][None], token_type_ids=golden["chat.image_embed_mask"][None],
                  attention_mask=torch.ones(1, golden.case("chat")["seq_len"], dtype=torch.long),
                  images=golden["image"])
    for extra in ({}, {"max_memory": {"cpu": 1_600_000}, "offload_folder": str(tmp_path / "offload")}):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, device_map="auto", **extra).eval()
        # transformers records (and dispatches with hooks) only a map that spans several devices
        placements = set(getattr(model, "hf_device_map", {"": "cpu"}).values())
        assert placements == ({"cpu"} if not extra else {"cpu", "disk"}), placements
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert out[0, -NEW_TOKENS:].tolist() == golden["chat.gen_ids"].tolist(), extra


def test_loading_errors_are_one_clear_line(tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(HF_DIR, "config.json"), no_weights)
    with pytest.raises(OSError, match="holds no model weights") as error:
        AutoModelForCausalLM.from_pretrained(str(no_weights))
    assert "\n" not in str(error.value)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(HF_DIR, mismatch)
    config = read_json(mismatch / "config.json")
    config.update(intermediate_size=100, num_hidden_layers=3)
    write_json(mismatch / "config.json", config)
    expected = r"does not match its weights: .*\[172, 64\] in the weights, \[100, 64\] by the config"
    with pytest.raises(ValueError, match=expected) as error:
        AutoModelForCausalLM.from_pretrained(str(mismatch))
    assert "\n" not in str(error.value)
    config.update(intermediate_size=172, hidden_act="gelu")
    write_json(mismatch / "config.json", config)
    with pytest.raises(ValueError, match="hidden_act='gelu' is not CogVLM's architecture"):
        AutoConfig.from_pretrained(str(mismatch))


# Training: gradient checkpointing, PEFT LoRA --------------------------------------------------------

def captcha_batch(tokenizer, count, seed=0):
    """Left-padded captcha conversations answered with their text; labels only on the answer and eos."""
    rng, rows = random.Random(seed), []
    for index in range(count):
        text = "".join(rng.choice("abc123") for _ in range(4))
        image = render_captcha(text, "clean", random.Random(seed + index))
        sample = build_conversation_input_ids(tokenizer, query="What does it say?", images=[image], image_size=56)
        answer = torch.tensor(tokenizer.encode(" " + text, add_special_tokens=False) + [tokenizer.eos_token_id])
        rows.append((torch.cat([sample["input_ids"], answer]),
                     torch.cat([sample["token_type_ids"], torch.zeros_like(answer)]),
                     torch.cat([torch.full_like(sample["input_ids"], -100), answer]), sample["images"][0]))
    length = max(len(row[0]) for row in rows)

    def left_pad(tensor, fill):
        return torch.cat([torch.full((length - len(tensor),), fill, dtype=tensor.dtype), tensor])
    return dict(input_ids=torch.stack([left_pad(row[0], 0) for row in rows]),
                token_type_ids=torch.stack([left_pad(row[1], 0) for row in rows]),
                attention_mask=torch.stack([left_pad(torch.ones_like(row[0]), 0) for row in rows]),
                labels=torch.stack([left_pad(row[2], -100) for row in rows]),
                images=torch.stack([row[3] for row in rows]))


def test_gradient_checkpointing_gives_the_same_gradients(hf_dir, tokenizer):
    batch = captcha_batch(tokenizer, count=2)
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(hf_dir).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(**batch).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and "model.vision.boi" in grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7), name


def test_peft_lora_trains_and_merges(hf_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    batch = captcha_batch(tokenizer, count=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    targets = ["language_expert_query_key_value", "language_expert_dense", "vision_expert_query_key_value",
               "vision_expert_dense", "query_key_value"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged_model = model.merge_and_unload()
        assert not any("lora" in name for name in merged_model.state_dict())
        merged = merged_model(**batch).logits
    assert_close_rel(merged, unmerged, what="LoRA merged vs unmerged")
