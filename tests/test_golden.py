"""Proof that our model is CogVLM: the reference implementation's numbers on the golden bundle."""
import pytest
import torch
from PIL import Image

from conftest import ALL_CASES, IMAGE_CASES, assert_close_rel, chat_turn, inference_args
from utils.generation_config import GenerationConfig
from utils.language import llama2_text_processor_inference
from utils.vision import get_image_processor

INPUT_KEYS = ["input_ids", "position_ids", "image_embed_mask", "vision_expert_mask", "image_rope_mask"]
NEW_TOKENS = 16


def upstream_inputs(golden, name, processor_output=None):
    """The keywords upstream's chat() gives the model: the text processor's masks and positions, and the image
    processor's outputs under a `vision_` prefix (no `images=`)."""
    length = golden[f"{name}.input_ids"].shape[0]
    inputs = dict(input_ids=golden[f"{name}.input_ids"][None], position_ids=golden[f"{name}.position_ids"][None],
                  attention_mask=torch.ones(1, 1, length, length).tril())
    if name != "text_only":
        inputs.update(vision_expert_mask=golden[f"{name}.vision_expert_mask"][None],
                      image_embed_mask=golden[f"{name}.image_embed_mask"][None])
        image = processor_output or get_image_processor(56)(Image.open(golden.image_path).convert("RGB"))
        inputs.update({"vision_" + key: value for key, value in image.items()})
    return inputs


def case_inputs(golden, name, with_image=True):
    kwargs = {}
    if with_image and name != "text_only":
        kwargs = dict(vision_expert_mask=golden[f"{name}.vision_expert_mask"][None],
                      image_embed_mask=golden[f"{name}.image_embed_mask"][None], images=golden["image"])
    length = golden[f"{name}.input_ids"].shape[0]
    return dict(input_ids=golden[f"{name}.input_ids"][None], position_ids=golden[f"{name}.position_ids"][None],
                attention_mask=torch.ones(1, 1, length, length).tril(), **kwargs)


def processor_for(golden, tokenizers, name, model_args):
    signal = golden.case(name).get("signal_type", "chat")
    length = golden.case(name)["seq_len"]
    return llama2_text_processor_inference(tokenizers[signal], length + NEW_TOKENS, model_args.image_length)


def test_checkpoint_loads_with_every_key(golden, golden_model):
    model, _ = golden_model
    checkpoint = torch.load(f"{golden.checkpoint}/1/mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert set(model.state_dict()) == set(checkpoint)
    for key, value in checkpoint.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_image_tensor_identical(golden):
    image = get_image_processor(56)(Image.open(golden.image_path))["image"]
    assert image.dtype == torch.float32
    assert torch.equal(image, golden["image"])


@torch.no_grad()
def test_vit_and_adapter_outputs(golden, golden_model):
    model, _ = golden_model
    eva = model.get_mixin("eva")
    vit_out = eva.vit_model(golden["image"])[0]
    assert_close_rel(vit_out, golden["eva_out"], what="eva_out")
    assert_close_rel(eva.linear_proj(vit_out), golden["image_emb"], what="image_emb")


@pytest.mark.parametrize("name", ALL_CASES)
def test_processor_builds_reference_inputs(golden, golden_model, tokenizers, name):
    _, model_args = golden_model
    case = golden.case(name)
    processor = processor_for(golden, tokenizers, name, model_args)
    if name == "text_only":
        prompt = case["prompt"]
    else:
        prompt = processor.history_to_prompt([tuple(turn) for turn in case["history"]], case["query"])
        assert prompt == case["prompt"]
    inputs = processor(prompt)
    for key in INPUT_KEYS:
        if f"{name}.{key}" in golden.tensors:
            assert torch.equal(inputs[key][0], golden[f"{name}.{key}"]), key
    length = case["seq_len"]
    assert torch.equal(inputs["attention_mask"], torch.ones(1, 1, length, length).tril())


@pytest.mark.parametrize("name", ALL_CASES)
@torch.no_grad()
def test_full_forward_logits(golden, golden_model, name):
    model, _ = golden_model
    logits = model(**case_inputs(golden, name))[0]
    assert_close_rel(logits[0], golden[f"{name}.logits"], what=f"{name}.logits")


@pytest.mark.parametrize("name", ALL_CASES)
@torch.no_grad()
def test_full_forward_logits_upstream_call_form(golden, golden_model, name):
    """`model(input_ids=, position_ids=, attention_mask=, vision_expert_mask=, image_embed_mask=,
    **{"vision_" + k: v for k, v in image_processor(img).items()})`, as upstream's chat.py calls it: the
    reference logits, and exactly those of `images=`."""
    model, _ = golden_model
    logits = model(**upstream_inputs(golden, name))[0]
    assert_close_rel(logits[0], golden[f"{name}.logits"], what=f"{name}.logits (vision_image)")
    assert torch.equal(logits, model(**case_inputs(golden, name))[0])


@pytest.mark.parametrize("name", IMAGE_CASES)
@torch.no_grad()
def test_full_forward_logits_with_the_text_processors_whole_output(golden, golden_model, tokenizers, name):
    """Upstream's chat() passes everything the text processor returns (image_rope_mask included) beside the
    `vision_` inputs; positions may then be left to image_rope_mask."""
    model, model_args = golden_model
    case = golden.case(name)
    inputs = processor_for(golden, tokenizers, name, model_args)(case["prompt"])
    vision = {"vision_" + k: v for k, v in get_image_processor(56)(Image.open(golden.image_path)).items()}
    logits = model(**inputs, **vision)[0]
    assert_close_rel(logits[0], golden[f"{name}.logits"], what=f"{name}.logits (whole processor output)")
    del inputs["position_ids"]
    assert torch.equal(model(**inputs, **vision)[0], logits)


@pytest.mark.parametrize("name", IMAGE_CASES)
@torch.no_grad()
def test_greedy_tokens_through_sats_filling_sequence(golden, tokenizers, name):
    """Upstream's generation path: SAT's filling_sequence with its CachedAutoregressiveMixin and the text
    processor's get_func, image inputs as `vision_*` keywords (passed again at every step, as SAT does)."""
    from sat.generation.autoregressive_sampling import filling_sequence
    from sat.generation.sampling_strategies import BaseStrategy
    from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin

    from models import CogVLMModel

    model, model_args = CogVLMModel.from_pretrained(golden.checkpoint, args=inference_args())
    model.eval().add_mixin("auto-regressive", CachedAutoregressiveMixin())
    case = golden.case(name)
    text_processor = processor_for(golden, tokenizers, name, model_args)
    inputs = text_processor(case["prompt"])
    image = get_image_processor(56)(Image.open(golden.image_path))
    input_ids = inputs.pop("input_ids")[0]
    seq = torch.cat([input_ids, torch.full((NEW_TOKENS,), -1)])
    get_func = text_processor.get_func(input_ids, **inputs)
    for key in ("position_ids", "attention_mask"):  # get_func makes these, as upstream's processor left them out
        inputs.pop(key)
    with torch.no_grad():
        output = filling_sequence(model, seq, batch_size=1, strategy=BaseStrategy(top_k=1, end_tokens=[]),
                                  get_masks_and_position_ids=get_func,
                                  **{"vision_" + k: v for k, v in image.items()}, **inputs)[0]
    assert output[0, len(input_ids):].tolist() == golden[f"{name}.gen_ids"].tolist()


@pytest.mark.parametrize("name", IMAGE_CASES)
@torch.no_grad()
def test_teacher_forced_logits(golden, golden_model, name):
    model, _ = golden_model
    ids = torch.cat([golden[f"{name}.input_ids"], golden[f"{name}.gen_ids"]])[None]
    pad = torch.zeros(1, NEW_TOKENS, dtype=torch.long)
    length = ids.shape[1]
    logits = model(input_ids=ids, position_ids=golden[f"{name}.position_ids_full_seq"][None],
                   attention_mask=torch.ones(1, 1, length, length).tril(),
                   vision_expert_mask=torch.cat([golden[f"{name}.vision_expert_mask"][None], pad], 1),
                   image_embed_mask=torch.cat([golden[f"{name}.image_embed_mask"][None], pad], 1),
                   images=golden["image"])[0]
    assert_close_rel(logits[0], golden[f"{name}.logits_teacher_forced"], what=f"{name}.logits_teacher_forced")
    upstream = model(input_ids=ids, position_ids=golden[f"{name}.position_ids_full_seq"][None],
                     attention_mask=torch.ones(1, 1, length, length).tril(),
                     vision_expert_mask=torch.cat([golden[f"{name}.vision_expert_mask"][None], pad], 1),
                     image_embed_mask=torch.cat([golden[f"{name}.image_embed_mask"][None], pad], 1),
                     vision_image=golden["image"])[0]
    assert torch.equal(upstream, logits)


@pytest.mark.parametrize("name", ALL_CASES)
def test_greedy_tokens_through_chat_core(golden, golden_model, tokenizers, name, monkeypatch):
    """Greedy decoding with the KV cache gives the reference tokens, and each step's logits match."""
    from utils.generation import Sampler

    model, model_args = golden_model
    case = golden.case(name)
    processor = processor_for(golden, tokenizers, name, model_args)
    step_logits = []
    original = Sampler.next_tokens

    def recording_pick(self, logits, generated):
        step_logits.append(logits[0].clone())
        return original(self, logits, generated)

    monkeypatch.setattr(Sampler, "next_tokens", recording_pick)
    image_path = None if name == "text_only" else golden.image_path
    query = "Hello, who are you?" if name == "text_only" else case["query"]
    history = [tuple(turn) for turn in case.get("history", [])]
    config = GenerationConfig(max_length=case["seq_len"] + NEW_TOKENS, top_k=1, end_token_ids=[])
    stream = chat_turn(model, processor, image_path, query, history, config)
    assert stream.prompt_length == case["seq_len"]
    list(stream)
    assert stream.token_ids == golden[f"{name}.gen_ids"].tolist()
    assert_close_rel(torch.stack(step_logits), golden[f"{name}.step_logits"], what=f"{name}.step_logits")
    assert stream.conversation.history[-1][0] == query


LORA_PREFIX = "lora.state_dict."


@pytest.fixture(scope="module")
def lora_model(golden):
    """The bundle's checkpoint with the bundle's LoRA matrices (rank 4, alpha 1) on LLM and ViT attention."""
    from models import FineTuneTestCogVLMModel

    model, model_args = FineTuneTestCogVLMModel.from_pretrained(
        golden.checkpoint, args=inference_args(), overwrite_args={"use_lora": True, "lora_rank": 4})
    lora = {k[len(LORA_PREFIX):]: v for k, v in golden.tensors.items() if k.startswith(LORA_PREFIX)}
    assert len(lora) == len(golden.case("lora")["lora_matrix_keys"])
    result = model.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys
    assert set(model.state_dict()) == set(golden.case("lora")["state_dict_keys_with_lora"])
    return model.eval()


@torch.no_grad()
def test_lora_unmerged_then_merged(golden, lora_model):
    inputs = case_inputs(golden, "chat_hist")
    assert_close_rel(lora_model(**inputs)[0][0], golden["lora.logits_unmerged"], what="lora unmerged")
    lora_model.merge_lora()
    assert set(lora_model.state_dict()) == set(golden.case("lora")["state_dict_keys_after_merge"])
    assert_close_rel(lora_model(**inputs)[0][0], golden["lora.logits_merged"], what="lora merged")


def test_chat_api_multi_turn_history(golden, golden_model, tokenizers):
    """Upstream `chat()`: the second turn's prompt carries the first turn; the image is reused."""
    from utils.chat import chat

    model, model_args = golden_model
    processor = llama2_text_processor_inference(tokenizers["chat"], 200, model_args.image_length)
    stop_at = golden["chat.gen_ids"][2].item()  # end the first answer after three greedy tokens
    image_processor = get_image_processor(56)
    response, history, image = chat(golden.image_path, model, processor, image_processor, "What is in the image?",
                                    max_length=200, top_k=1, repetition_penalty=1.0, end_token_ids=[stop_at])
    expected = tokenizers["chat"].decode(golden["chat.gen_ids"][:2].tolist()).strip()
    assert response == expected and history == [("What is in the image?", response)]
    pieces = []
    response2, history2, _ = chat(None, model, processor, image_processor, "What color is the sky?", history=history,
                                  image=image, max_length=200, top_k=1, repetition_penalty=1.0, end_token_ids=[stop_at],
                                  on_text=pieces.append)
    assert history2 == history + [("What color is the sky?", response2)]
    assert "".join(pieces).strip() == response2


@torch.no_grad()
def test_bf16_on_cpu_tracks_fp32(golden):
    """--bf16 builds a bf16 model that runs on CPU; its logits stay near the fp32 reference."""
    from models import CogVLMModel

    args = inference_args()
    args.bf16 = True
    model, _ = CogVLMModel.from_pretrained(golden.checkpoint, args=args)
    assert next(model.parameters()).dtype == torch.bfloat16
    inputs = case_inputs(golden, "chat")
    inputs["images"] = inputs["images"].bfloat16()
    logits = model(**inputs)[0][0].float()
    expected = golden["chat.logits"]
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("our_kernel", [True, False], ids=["native-attention", "torch-attention"])
@torch.no_grad()
def test_bf16_decoding_on_cpu_attends_over_its_cache(golden, our_kernel, monkeypatch):
    """A bf16 model's KV cache on CPU holds bf16 where our decode attention runs (models.kernels.native), fp32 under
    torch's attention (models.kv_cache.cache_dtype); either way a cached decode step gives the logits of an
    uncached forward over the same tokens, in bf16's precision."""
    from models import CogVLMModel
    from models.kernels import native
    from models.kv_cache import KVCache, ensure_kv_cache_mixin

    if not our_kernel:
        monkeypatch.setattr(native, "available", lambda: False)

    args = inference_args()
    args.bf16 = True
    model, _ = CogVLMModel.from_pretrained(golden.checkpoint, args=args)
    ensure_kv_cache_mixin(model)
    inputs = case_inputs(golden, "chat")
    inputs["images"] = inputs["images"].bfloat16()
    length = inputs["input_ids"].shape[1]
    attention = model.transformer.layers[0].attention
    cache = KVCache(len(model.transformer.layers), 1, attention.num_attention_heads_per_partition, length + 1,
                    attention.hidden_size_per_attention_head, torch.bfloat16, "cpu")
    assert cache.buffer.dtype == (torch.bfloat16 if our_kernel and native.available() else torch.float32)
    model(**inputs, kv_cache=cache)
    cache.length = length
    token = golden["chat.gen_ids"][:1][None]
    position = inputs["position_ids"][:, -1:] + 1
    step = model(input_ids=token, position_ids=position, attention_mask=torch.ones(1, 1, 1, length + 1),
                 kv_cache=cache)[0][0, -1]
    full_inputs = dict(inputs, input_ids=torch.cat([inputs["input_ids"], token], 1),
                       position_ids=torch.cat([inputs["position_ids"], position], 1),
                       attention_mask=torch.ones(1, 1, length + 1, length + 1).tril(),
                       vision_expert_mask=torch.cat([inputs["vision_expert_mask"], torch.zeros(1, 1, dtype=torch.long)], 1),
                       image_embed_mask=torch.cat([inputs["image_embed_mask"], torch.zeros(1, 1, dtype=torch.long)], 1))
    full = model(**full_inputs)[0][0, -1]
    assert step.dtype == torch.bfloat16
    assert_close_rel(step, full, rel=0.05, what="cached bf16 step vs uncached forward")
