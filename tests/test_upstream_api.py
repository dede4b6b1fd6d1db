"""The upstream call forms: signatures as upstream CogVLM defines them, each called as a ported script calls
it, and every input the model cannot use refused with a CogVLMError naming it (never ignored)."""
import inspect
import os
import shutil

import pytest
import torch
from PIL import Image

from conftest import assert_close_rel, inference_args
from models import CogVLMModel
from models.errors import CheckpointError, CogVLMError, PromptError
from utils.chat import chat
from utils.language import llama2_text_processor_inference, llama2_tokenizer
from utils.vision import get_image_processor

# Upstream CogVLM's public signatures (utils/chat.py, utils/language.py, utils/vision.py, SAT's BaseModel):
# (name, default) in order; inspect.Parameter.empty where there is none.
EMPTY = inspect.Parameter.empty
UPSTREAM_SIGNATURES = {
    "chat": [("image_path", EMPTY), ("model", EMPTY), ("text_processor", EMPTY), ("img_processor", EMPTY),
             ("query", EMPTY), ("history", None), ("image", None), ("max_length", 1024), ("top_p", 0.7),
             ("top_k", 30), ("temperature", 0.95), ("repetition_penalty", 1.2), ("invalid_slices", []),
             ("no_prompt", False), ("force_pil_image", None)],
    "history_to_prompt": [("self", EMPTY), ("history", EMPTY), ("query", EMPTY)],
    "text_processor_call": [("self", EMPTY), ("prompt", "")],
    "llama2_tokenizer": [("tokenizer_path", EMPTY), ("signal_type", "base")],
    "get_image_processor": [("image_size", EMPTY)],
    "from_pretrained": [("name", EMPTY), ("args", None), ("home_path", None), ("url", None), ("prefix", ""),
                        ("build_only", False), ("use_node_group", True), ("overwrite_args", {})],
}


def leading_parameters(function, count):
    return [(p.name, p.default) for p in list(inspect.signature(function).parameters.values())[:count]]


def same_defaults(ours, upstream):
    """Same names and defaults; upstream's mutable `[]` default matches our `()`, and a parameter upstream
    requires may have a default here."""
    def norm(default):
        return list(default) if isinstance(default, (list, tuple)) else default
    return len(ours) == len(upstream) and all(
        name == up_name and (up_default is EMPTY or norm(default) == norm(up_default))
        for (name, default), (up_name, up_default) in zip(ours, upstream))


@pytest.mark.parametrize("name, function", [
    ("chat", chat),
    ("history_to_prompt", llama2_text_processor_inference.history_to_prompt),
    ("text_processor_call", llama2_text_processor_inference.__call__),
    ("llama2_tokenizer", llama2_tokenizer),
    ("get_image_processor", get_image_processor),
])
def test_signature_matches_upstream(name, function):
    upstream = UPSTREAM_SIGNATURES[name]
    assert same_defaults(leading_parameters(function, len(upstream)), upstream)


def test_from_pretrained_takes_sats_arguments():
    upstream = UPSTREAM_SIGNATURES["from_pretrained"]
    ours = leading_parameters(CogVLMModel.from_pretrained, len(upstream))
    assert [n for n, _ in ours] == [n for n, _ in upstream]
    assert [d for _, d in ours][:-1] == [d for _, d in upstream][:-1] and ours[-1][1] in (None, {})


def test_image_processor_returns_upstreams_keys(golden):
    out = get_image_processor(56)(Image.open(golden.image_path))
    assert set(out) == {"image", "input_ids", "position_ids", "attention_mask"}
    assert torch.equal(out["image"], golden["image"])
    assert out["input_ids"].tolist() == [[0]] and out["attention_mask"].tolist() == [[1]] and out["position_ids"] is None


def test_text_processor_has_upstreams_attributes(tokenizers):
    processor = llama2_text_processor_inference(tokenizers["chat"], 200, 16)
    assert processor.sep == "Answer:" and processor.invalid_slices == []
    assert llama2_text_processor_inference(tokenizers["vqa"], 200, 16).sep == "Short answer:"
    assert llama2_text_processor_inference(tokenizers["base"], 200, 16).sep == "<unk>"
    prompt = processor.history_to_prompt([("Hi", "Hello")], "What is it?")
    assert prompt == "<EOI>Question: Hi Answer: Hello\nQuestion: What is it? Answer:"
    with pytest.raises(PromptError, match=r"\(history, query\)"):
        processor.history_to_prompt("What is it?", [("Hi", "Hello")])  # our old order is refused, not rendered


def test_get_func_gives_the_processors_positions_and_continues_them(golden, tokenizers):
    processor = llama2_text_processor_inference(tokenizers["chat"], 200, 16)
    inputs = processor(golden.case("chat")["prompt"])
    length = inputs["input_ids"].shape[1]
    tokens, mask, positions = processor.get_func(inputs["input_ids"][0], **inputs)(
        torch.cat([inputs["input_ids"][0], torch.full((3,), -1)]))
    assert torch.equal(positions[:, :length], inputs["position_ids"])
    assert positions[0, length:].tolist() == [positions[0, length - 1].item() + k for k in (1, 2, 3)]
    assert torch.equal(mask, torch.ones(1, 1, length + 3, length + 3).tril()) and tokens.shape == (1, length + 3)


# chat() as upstream scripts call it --------------------------------------------------------------

def greedy(max_length=60):
    return dict(top_k=1, repetition_penalty=1.0, max_length=max_length)


def test_chat_takes_the_image_as_path_pil_or_returned_pair(golden, golden_model, tokenizers):
    model, model_args = golden_model
    text_processor = llama2_text_processor_inference(tokenizers["chat"], 60, model_args.image_length)
    image_processor = get_image_processor(56)
    stop = [golden["chat.gen_ids"][3].item()]
    by_path, history, pair = chat(golden.image_path, model, text_processor, image_processor, "What is in the image?",
                                  end_token_ids=stop, **greedy())
    assert by_path == tokenizers["chat"].decode(golden["chat.gen_ids"][:3].tolist()).strip()
    assert set(pair[0]) == {"image", "input_ids", "position_ids", "attention_mask"} and pair[1].size == (80, 60)
    pil = Image.open(golden.image_path)
    for image in (pil, pair, (None, pil)):
        response, _, _ = chat(None, model, text_processor, image_processor, "What is in the image?", image=image,
                              end_token_ids=stop, **greedy())
        assert response == by_path
    forced, _, _ = chat("/does/not/exist.png", model, text_processor, image_processor, "What is in the image?",
                        force_pil_image=pil, end_token_ids=stop, **greedy())
    assert forced == by_path
    text_only, _, none_pair = chat(None, model, text_processor, image_processor, "Hello", image=(None, None),
                                   **greedy(max_length=30))
    assert none_pair == (None, None)
    with pytest.raises(CogVLMError, match="image="):
        chat(None, model, text_processor, image_processor, "Hi", image="a string", **greedy())


def test_chat_no_prompt_sends_the_image_alone(golden, golden_model, tokenizers, monkeypatch):
    """--no_prompt, as upstream: the prompt is the image block only, whatever the template and history."""
    import utils.chat

    model, model_args = golden_model
    text_processor = llama2_text_processor_inference(tokenizers["chat"], 60, model_args.image_length)
    seen = []
    original = utils.chat.ChatStream.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.inputs["input_ids"])

    monkeypatch.setattr(utils.chat.ChatStream, "__init__", record)
    chat(golden.image_path, model, text_processor, get_image_processor(56), "ignored question",
         history=[("Hi", "Hello")], no_prompt=True, **greedy(max_length=30))
    assert seen[0].tolist() == [[tokenizers["chat"].bos_token_id] + [0] * (model_args.image_length + 2)]


# from_pretrained's arguments ---------------------------------------------------------------------

def test_from_pretrained_home_path_and_overwrite_model_parallel_size(golden, tmp_path):
    shutil.copytree(golden.checkpoint, tmp_path / "my-cogvlm")
    model, args = CogVLMModel.from_pretrained("my-cogvlm", args=inference_args(), home_path=str(tmp_path),
                                              overwrite_args={"model_parallel_size": 1})
    reference = torch.load(os.path.join(golden.checkpoint, "1", "mp_rank_00_model_states.pt"), weights_only=True)
    assert torch.equal(model.state_dict()["mixins.eva.boi"], reference["module"]["mixins.eva.boi"])
    assert args.model_parallel_size == 1
    built, _ = CogVLMModel.from_pretrained("my-cogvlm", args=inference_args(), home_path=str(tmp_path),
                                           build_only=True)
    assert not torch.equal(built.state_dict()["mixins.eva.boi"], reference["module"]["mixins.eva.boi"])
    with pytest.raises(CheckpointError, match="not in " + str(tmp_path / "elsewhere")):
        CogVLMModel.from_pretrained("my-cogvlm", args=inference_args(), home_path=str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("extra, named", [
    (dict(url="https://example.com/cogvlm.zip"), "url="),
    (dict(prefix="model."), "prefix="),
    (dict(use_node_group=False), "use_node_group=False"),
    (dict(specific_iteration=2), "specific_iteration="),
    (dict(parallel_output=True), "parallel_output="),
])
def test_from_pretrained_refuses_what_it_would_not_use(golden, extra, named):
    with pytest.raises(CheckpointError, match=named):
        CogVLMModel.from_pretrained(golden.checkpoint, args=inference_args(), **extra)


def test_from_pretrained_refuses_two_splits(golden):
    args = inference_args()
    args.model_parallel_size = 2
    with pytest.raises(CheckpointError, match="model_parallel_size"):
        CogVLMModel.from_pretrained(golden.checkpoint, args=args, overwrite_args={"model_parallel_size": 4})


# The forward refuses what it cannot use ----------------------------------------------------------

def image_inputs(golden, name="chat"):
    length = golden[f"{name}.input_ids"].shape[0]
    return dict(input_ids=golden[f"{name}.input_ids"][None], position_ids=golden[f"{name}.position_ids"][None],
                attention_mask=torch.ones(1, 1, length, length).tril(),
                vision_expert_mask=golden[f"{name}.vision_expert_mask"][None],
                image_embed_mask=golden[f"{name}.image_embed_mask"][None])


def text_inputs(golden):
    return image_inputs(golden, "text_only")


@pytest.mark.parametrize("misuse, named", [
    (lambda g: dict(image_inputs(g), images=g["image"], imgs=g["image"]), "'imgs'"),
    (lambda g: dict(image_inputs(g), images=g["image"], log_attention_weights=torch.zeros(1)),
     "'log_attention_weights'"),
    (lambda g: dict(text_inputs(g), vision_image=g["image"]), "image_embed_mask marks no image positions"),
    (lambda g: dict(text_inputs(g), images=g["image"]), "image_embed_mask marks no image positions"),
    (lambda g: image_inputs(g), "no image was given"),
    (lambda g: dict(image_inputs(g), images=g["image"], vision_image=g["image"]), "both images= and vision_image="),
    (lambda g: dict(image_inputs(g), vision_image=g["image"], vision_pixels=g["image"]), "vision_pixels"),
    (lambda g: dict(image_inputs(g), vision_input_ids=torch.zeros(1, 1, dtype=torch.long)), "without vision_image"),
    (lambda g: dict(image_inputs(g), vision_image=g["image"], vision_input_ids=torch.ones(1, 1, dtype=torch.long)),
     "vision_input_ids"),
    (lambda g: dict(image_inputs(g), vision_image=g["image"], vision_attention_mask=torch.zeros(1, 1)),
     "vision_attention_mask"),
    (lambda g: dict(image_inputs(g), vision_image=g["image"], vision_position_ids=torch.zeros(1, 1)),
     "vision_position_ids"),
    (lambda g: dict(image_inputs(g), images=g["image"], vision_expert_mask=None), "needs vision_expert_mask"),
    (lambda g: dict(image_inputs(g), images=torch.cat([g["image"], g["image"]])), "2 image"),
    (lambda g: dict(image_inputs(g), images=g["image"][0]), r"\(N, 3, S, S\)"),
    (lambda g: dict(image_inputs(g), images=g["image"], image_embed_mask=g["chat.image_embed_mask"][None, :-1]),
     "image_embed_mask has shape"),
    (lambda g: dict(text_inputs(g), vision_expert_mask=torch.ones_like(g["text_only.input_ids"])[None]),
     "outside the image block"),
    (lambda g: dict(image_inputs(g), images=g["image"], image_rope_mask=g["chat.image_embed_mask"][None]),
     "position_ids disagree with image_rope_mask"),
])
@torch.no_grad()
def test_forward_refuses_inputs_it_cannot_use(golden, golden_model, misuse, named):
    model, _ = golden_model
    with pytest.raises(CogVLMError, match=named):
        model(**misuse(golden))


@torch.no_grad()
def test_forward_refuses_a_cache_without_the_cache_mixin(golden):
    """A KV cache passed to a model that has no kv-cache mixin would be ignored (every step recomputed wrong)."""
    from models.kv_cache import KVCache

    model, _ = CogVLMModel.from_pretrained(golden.checkpoint, args=inference_args())
    cache = KVCache(2, 1, 4, 64, 16, torch.float32, "cpu")
    with pytest.raises(CogVLMError, match="'kv_cache'"):
        model(**image_inputs(golden), images=golden["image"], kv_cache=cache)


@torch.no_grad()
def test_forward_takes_sats_generation_keywords_as_none(golden, golden_model):
    """SAT's filling_sequence passes encoder_outputs / log_attention_weights as None: nothing to use, accepted."""
    model, _ = golden_model
    logits = model(**image_inputs(golden), images=golden["image"], encoder_outputs=None, log_attention_weights=None)[0]
    assert_close_rel(logits[0], golden["chat.logits"], what="chat.logits")


def test_hf_model_refuses_pixels_without_an_image_block(golden):
    from models.hf_cogvlm import CogVLMForCausalLM

    hf_dir = os.path.join(os.path.dirname(golden.dir), "tiny-small-hf")
    model = CogVLMForCausalLM.from_pretrained(hf_dir).eval()
    ids = golden["text_only.input_ids"][None]
    with pytest.raises(ValueError, match="0 image blocks"):
        model(input_ids=ids, images=[[golden["image"][0]]])
