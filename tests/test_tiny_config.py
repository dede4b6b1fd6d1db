"""A second tiny config (3 layers, 6 heads, 42px image, 1-layer ViT): shapes and cache consistency."""
import pytest
import torch
from PIL import Image

from conftest import inference_args
from models import CogVLMModel
from utils.generation import Sampler, generate_stream
from utils.generation_config import GenerationConfig
from models.inputs import rope_position_ids
from utils.language import llama2_text_processor_inference
from utils.vision import get_image_processor


class ByteTokenizer:
    """Minimal tokenizer (ids = bytes + 3) so these tests do not depend on the golden vocabulary."""
    bos_token_id, eos_token_id, unk_token_id, pad_token_id = 1, 2, 0, 0
    signal_type = "chat"

    def encode(self, text, add_special_tokens=False):
        return [b + 3 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, args = CogVLMModel.from_pretrained(tiny_checkpoint, args=inference_args())
    return model.eval(), args


def test_loads_second_config_with_its_shapes(tiny):
    model, args = tiny
    assert args.num_layers == 3 and args.num_attention_heads == 6 and args.image_length == 9
    assert len(model.transformer.layers) == 3
    assert model.get_mixin("eva").linear_proj.linear_proj.weight.shape == (48, 32)  # ViT width -> LLM width
    assert model.get_mixin("rotary").rotary_emb.inv_freq.shape == (4,)  # head_dim 8


def image_inputs(args, prompt="Question: what is this? Answer:"):
    processor = llama2_text_processor_inference(ByteTokenizer(), 200, args.image_length)
    inputs = processor("<EOI>" + prompt)
    image = Image.new("RGB", (30, 20), (200, 40, 10))
    return inputs, get_image_processor(args.eva_args["image_size"][0])(image)


@torch.no_grad()
def test_forward_shapes_with_and_without_image(tiny):
    model, args = tiny
    inputs, image = image_inputs(args)
    length = inputs["input_ids"].shape[1]
    assert length == 1 + args.image_length + 2 + len("Question: what is this? Answer:")
    assert inputs["position_ids"][0, :5].tolist() == [0, 1, 2, 2, 2]
    logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                   attention_mask=inputs["attention_mask"], vision_expert_mask=inputs["vision_expert_mask"],
                   image_embed_mask=inputs["image_embed_mask"], images=image["image"])[0]
    assert logits.shape == (1, length, 1000)
    text = llama2_text_processor_inference(ByteTokenizer(), 200, args.image_length)("hello")
    text_logits = model(input_ids=text["input_ids"], position_ids=text["position_ids"],
                        attention_mask=text["attention_mask"])[0]
    assert text_logits.shape == (1, 6, 1000)
    # the image matters: a different image changes the answer logits
    other = get_image_processor(42)(Image.new("RGB", (30, 20), (10, 40, 200)))
    logits_other = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                         attention_mask=inputs["attention_mask"], vision_expert_mask=inputs["vision_expert_mask"],
                         image_embed_mask=inputs["image_embed_mask"], images=other["image"])[0]
    assert (logits_other[0, -1] - logits[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_k=5, top_p=0.9, temperature=0.7)])
@torch.no_grad()
def test_cached_decoding_equals_teacher_forced_forward(tiny, sampling):
    model, args = tiny
    inputs, image = image_inputs(args)
    length = inputs["input_ids"].shape[1]
    inputs = dict(inputs, images=image["image"])
    config = GenerationConfig(max_length=length + 12, end_token_ids=[], seed=0, **sampling)
    generated = list(generate_stream(model, inputs, config))
    assert len(generated) == 12

    full_ids = torch.cat([inputs["input_ids"], torch.tensor([generated])], dim=1)
    pad = torch.zeros(1, 12, dtype=torch.long)
    positions = torch.cat([inputs["position_ids"], inputs["position_ids"][:, -1:] + torch.arange(1, 13)], dim=1)
    total = full_ids.shape[1]
    logits = model(input_ids=full_ids, position_ids=positions, attention_mask=torch.ones(1, 1, total, total).tril(),
                   vision_expert_mask=torch.cat([inputs["vision_expert_mask"], pad], 1),
                   image_embed_mask=torch.cat([inputs["image_embed_mask"], pad], 1), images=image["image"])[0]
    if sampling["top_k"] == 1:
        assert logits[0, length - 1:-1].argmax(-1).tolist() == generated
    # cached step logits == teacher-forced logits at the same positions
    recorded = []
    original = Sampler.next_tokens

    def record(self, step_logits, generated_so_far):
        recorded.append(step_logits[0].clone())
        return original(self, step_logits, generated_so_far)

    Sampler.next_tokens = record
    try:
        again = list(generate_stream(model, inputs, config))  # the same seed: the same tokens
    finally:
        Sampler.next_tokens = original
    assert again == generated
    diff = (torch.stack(recorded) - logits[0, length - 1:-1]).abs().max().item()
    assert diff < 1e-4 * logits.abs().max().item()


def test_generation_stops_at_end_token_and_max_length(tiny):
    model, args = tiny
    inputs, image = image_inputs(args)
    length = inputs["input_ids"].shape[1]
    inputs = dict(inputs, images=image["image"])
    first = next(generate_stream(model, inputs, GenerationConfig(max_length=length + 5, end_token_ids=[])))
    stopped = list(generate_stream(model, inputs, GenerationConfig(max_length=length + 5, end_token_ids=[first])))
    assert stopped == [first]
    assert len(list(generate_stream(model, inputs, GenerationConfig(max_length=length + 3, end_token_ids=[])))) == 3
    assert len(list(generate_stream(model, inputs, GenerationConfig(max_length=length + 5, max_new_tokens=2,
                                                                    end_token_ids=[])))) == 2
    # the default end token is the tokenizer's eos (GenerationConfig.end_token_ids None)
    assert GenerationConfig().end_tokens(eos_token_id=7) == [7]


def test_position_ids_share_one_position_per_image_run():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0]])
    assert rope_position_ids(mask).tolist() == [[0, 1, 2, 2, 2, 3, 4]]
    assert rope_position_ids(torch.zeros(1, 4, dtype=torch.long)).tolist() == [[0, 1, 2, 3]]


def test_greedy_pick_equals_sat_strategy_at_top_k_1(tiny):  # tiny: SAT initialised (model parallel group)
    from sat.generation.sampling_strategies import BaseStrategy

    config = GenerationConfig(top_k=1)
    assert config.greedy and GenerationConfig(temperature=0, top_k=5).greedy and not GenerationConfig(top_k=5).greedy
    logits, tokens = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 3, dtype=torch.long)
    fast = Sampler([config] * 4, [None] * 4).next_tokens(logits, [[]] * 4)
    sat = BaseStrategy(temperature=0.8, top_k=1, top_p=0.4, end_tokens=[2]).forward(logits, tokens, None)[0][:, -1]
    assert fast.tolist() == sat.tolist() and fast.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_gives_the_same_numbers(dtype):
    """`rotate_` (inference: no fresh tensor per operation) rotates a strided view of the QKV projection in
    place, bit for bit as `rotate` computes it, and leaves the values part alone."""
    from models.mixin import RotaryEmbedding

    rotary = RotaryEmbedding(8)
    mixed = torch.randn(2, 5, 3 * 4 * 8).to(dtype)  # (batch, seq, [query | key | value] x 4 heads x 8)
    qkv = mixed.view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    positions = torch.arange(3, 8)[None]
    expected, values = rotary.rotate(qkv[:2], positions), qkv[2].clone()
    with torch.no_grad():
        rotated = rotary.rotate_(qkv[:2], positions)
    assert rotated.data_ptr() == mixed.data_ptr() and rotated.dtype == dtype
    assert torch.equal(rotated, expected) and torch.equal(qkv[2], values)


def test_rotary_reuses_angles_only_for_the_same_unchanged_positions():
    """The rotary embedding computes cos/sin once per forward (all layers pass one position_ids tensor);
    a new tensor, or the same one changed in place, must get fresh angles."""
    from models.mixin import RotaryEmbedding

    def reference(x, positions, inv_freq):  # GPT-NeoX rotate-half
        angles = positions.float()[:, None, :, None] * inv_freq
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * angles.cos() - second * angles.sin(), first * angles.sin() + second * angles.cos()), -1)

    rotary = RotaryEmbedding(8)
    x = torch.randn(1, 2, 5, 8)
    positions = torch.arange(5)[None]
    for step in range(3):
        query, key = rotary(x, 2 * x, positions)
        assert torch.allclose(query, reference(x, positions, rotary.inv_freq), atol=1e-6), step
        assert torch.allclose(key, reference(2 * x, positions, rotary.inv_freq), atol=1e-6), step
        if step == 0:
            positions.add_(7)  # in place
        else:
            positions = positions + 1  # a new tensor
