"""Batched generation: several prompts and images at once equal one-by-one greedy runs."""
import torch
from PIL import Image

from conftest import ALL_CASES
from utils.generation import collate, generate_batch
from utils.generation_config import GenerationConfig
from utils.language import llama2_text_processor_inference
from utils.vision import get_image_processor

NEW_TOKENS = 16


def golden_prompts(golden, tokenizers, model_args):
    prompts, images = [], []
    image = get_image_processor(56)(Image.open(golden.image_path))
    for name in ALL_CASES:
        case = golden.case(name)
        processor = llama2_text_processor_inference(tokenizers[case.get("signal_type", "chat")], 4096,
                                                    model_args.image_length)
        if name == "text_only":
            prompts.append(processor(case["prompt"]))
            images.append(None)
        else:
            prompts.append(processor(processor.history_to_prompt([tuple(t) for t in case["history"]], case["query"])))
            images.append(image)
    return prompts, images


def test_batch_of_all_golden_cases_gives_their_greedy_tokens(golden, golden_model, tokenizers):
    """Five prompts of lengths 24..77, four with the image and one text-only, in one batch."""
    model, model_args = golden_model
    prompts, images = golden_prompts(golden, tokenizers, model_args)
    longest = max(p["input_ids"].shape[1] for p in prompts)
    config = GenerationConfig(max_length=longest + NEW_TOKENS, top_k=1, end_token_ids=[])
    outputs = generate_batch(model, prompts, config, images)
    for name, tokens, prompt in zip(ALL_CASES, outputs, prompts):
        assert len(tokens) == longest + NEW_TOKENS - prompt["input_ids"].shape[1]  # each row to its own limit
        assert tokens[:NEW_TOKENS] == golden[f"{name}.gen_ids"].tolist(), name


def test_rows_stop_independently_at_end_tokens(golden, golden_model, tokenizers):
    model, model_args = golden_model
    prompts, images = golden_prompts(golden, tokenizers, model_args)
    end_token = golden["chat.gen_ids"][3].item()  # the chat row's 4th token ends that row early
    outputs = generate_batch(model, prompts, GenerationConfig(max_length=100, top_k=1, end_token_ids=[end_token]),
                             images)
    for name, tokens in zip(ALL_CASES, outputs):
        reference = golden[f"{name}.gen_ids"].tolist()
        if end_token in reference:
            assert tokens == reference[:reference.index(end_token) + 1], name
        else:
            assert tokens[:NEW_TOKENS] == reference and end_token not in tokens[:NEW_TOKENS], name
    assert len(outputs[ALL_CASES.index("chat")]) == 4


def test_collate_left_pads_with_blind_masks():
    short = {"input_ids": torch.tensor([[1, 5]]), "position_ids": torch.tensor([[0, 1]]),
             "image_embed_mask": torch.zeros(1, 2, dtype=torch.long), "vision_expert_mask": torch.zeros(1, 2, dtype=torch.long)}
    long = {"input_ids": torch.tensor([[1, 6, 7, 8]]), "position_ids": torch.tensor([[0, 1, 2, 3]]),
            "image_embed_mask": torch.zeros(1, 4, dtype=torch.long), "vision_expert_mask": torch.zeros(1, 4, dtype=torch.long)}
    batch = collate([short, long], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 5], [1, 6, 7, 8]]
    assert batch["position_ids"][0, 2:].tolist() == [0, 1]
    assert batch["valid"].tolist() == [[False, False, True, True], [True] * 4]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0, 3].tolist() == [0, 0, 1, 1] and mask[1, 0, 2].tolist() == [1, 1, 1, 0]
    assert mask[0, 0, 0].tolist() == [1, 0, 0, 0]  # a padding row sees only itself
