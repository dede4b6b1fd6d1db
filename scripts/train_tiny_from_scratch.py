"""The exact recipe of the shipped tiny captcha CogVLM (checkpoints/cogvlm-tiny-captcha).

    python scripts/make_captcha_dataset.py --out /tmp/tc/clean --count 24000 --style clean --seed 0
    python scripts/split_dataset.py --src /tmp/tc/clean --dst /tmp/tc/clean_split --link
    OMP_NUM_THREADS=1 python scripts/train_tiny_from_scratch.py --data /tmp/tc/clean_split --steps 3000 \
        --lr 1e-3 --save /tmp/tc/stage1.pt
    OMP_NUM_THREADS=1 python scripts/train_tiny_from_scratch.py --data /tmp/tc/clean_split --steps 2000 \
        --lr 1e-3 --init /tmp/tc/stage1.pt --seed 2 --save /tmp/tc/stage2.pt --export checkpoints/cogvlm-tiny-captcha

A plain AdamW loop over the same model, dataset and loss code as finetune_demo.py, without SAT's
training_main/DeepSpeed: on this 2-core CPU it is what we could iterate on quickly. Every weight
matrix starts at std 0.088 (1/sqrt(hidden)); the loss sits on the "ignore the image" plateau (~3.1)
for ~1100 steps before it drops (measured: 2.56 at step 1400, 1.28 at 2000, 0.79 at 3000).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from finetune_demo import next_token_loss  # noqa: E402
from models import FineTuneTrainCogVLMModel  # noqa: E402
from utils.dataset import CaptchaDataset, collate_captchas, exact_match, label_of, llama2_text_processor, read_captcha  # noqa: E402
from utils.language import llama2_text_processor_inference, llama2_tokenizer  # noqa: E402
from utils.vision import get_image_processor  # noqa: E402

CONFIG = os.path.join(ROOT, "scripts", "tiny_captcha")
TOKENIZER = os.path.join(ROOT, "tests", "golden", "tiny-small", "tokenizer")


def build(init_path, std=0.088):
    args = argparse.Namespace(deepspeed=None, local_rank=0, rank=0, world_size=1, model_parallel_size=1,
                              mode="finetune", skip_init=True, use_gpu_initialization=False, device="cpu",
                              bf16=False, fp16=False, force_train=True)
    model, model_args = FineTuneTrainCogVLMModel.from_pretrained(CONFIG, args, build_only=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, std)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    if init_path:
        model.load_state_dict(torch.load(init_path, weights_only=True))
    return model, model_args


def evaluate(model, processor, dataset, count):
    model.eval()
    predictions = [read_captcha(model, processor, dataset[i]["image"]) for i in range(count)]
    if "kv-cache" in model.mixins:  # the chat core's decoding mixin: not for training
        model.del_mixin("kv-cache")
    return exact_match(predictions, [label_of(dataset.files[i]) for i in range(count)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="split folder with train/ and valid/")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default=None, help="state dict to continue from")
    parser.add_argument("--save", required=True, help="state dict written every 500 steps and at the end")
    parser.add_argument("--export", default=None, help="also write a SAT checkpoint + tokenizer here")
    args = parser.parse_args()

    model, model_args = build(args.init)
    tokenizer = llama2_tokenizer(TOKENIZER, "base")
    train_processor = llama2_text_processor(tokenizer, 96, model_args.image_length)
    infer_processor = llama2_text_processor_inference(tokenizer, 96, model_args.image_length)
    images = get_image_processor(model_args.eva_args["image_size"][0])
    train = CaptchaDataset(os.path.join(args.data, "train"), images, train_processor)
    valid = CaptchaDataset(os.path.join(args.data, "valid"), images, train_processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    start, smoothed = time.time(), None
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        batch = collate_captchas([train[rng.randrange(len(train))] for _ in range(args.batch)])
        labels = batch.pop("labels")
        batch.pop("context_length")
        loss = next_token_loss(model(**batch)[0], labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {smoothed:.3f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if (step + 1) % 500 == 0 or step == args.steps - 1:
            print(f"step {step + 1} valid {evaluate(model, infer_processor, valid, 96)}", flush=True)
            torch.save(model.state_dict(), args.save)
    if args.export:
        from utils.hf_format import write_sat_checkpoint

        config = json.load(open(os.path.join(CONFIG, "model_config.json")))
        if os.path.isdir(args.export):
            shutil.rmtree(args.export)
        write_sat_checkpoint(args.export, config, {k: v.contiguous() for k, v in model.state_dict().items()})
        shutil.copytree(TOKENIZER, os.path.join(args.export, "tokenizer"))


if __name__ == "__main__":
    main()
