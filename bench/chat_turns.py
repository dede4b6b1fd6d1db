"""Time to first token of a chat's turns through the serving engine, with and without prefix reuse.

    python bench/chat_turns.py                      # config M, fp32 and --quant 4, 2 threads
    python bench/chat_turns.py --quant 0 --repeats 1 --max_new_tokens 8

A 3-turn chat about one 224 px image (assets/shapes.png), each turn sent as the API server and the web demo
send it: the whole conversation so far (history + question) through `pipeline.chat(..., engine)`'s inputs on a
utils.engine.Engine. Per turn the time to first token (TTFT: from building the turn's inputs to its first
token), with the prefix cache (default budget) and without it (`prefix_cache_gb=0`), and whether the greedy
answers agree token for token. Each repeat runs the chat on a fresh engine (nothing kept from the last one);
figures are medians over --repeats, after a warm-up chat about another image.

The model is bench/serve.py's: config M with random weights, saved once as a checkpoint and loaded the way the
front ends load it (`--quant 4` quantizing while it loads), the golden tokenizer, an LM head that only ever
picks plain words (so answers are text and every turn has --max_new_tokens tokens).
Last line: `turn-2 TTFT / turn-1 TTFT: X.XXx (fp32), Y.YYx (int4)`, with the cache (target <= 0.25x).
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGE = os.path.join(ROOT, "assets", "shapes.png")
WARM_UP_IMAGE = os.path.join(ROOT, "assets", "house.png")
QUESTIONS = ["What shapes and colours are in this image?", "Which of them is the largest?",
             "Describe the background in a few words."]


def chat(pipeline, engine, image, max_new_tokens: int):
    """The three turns on `engine`: per turn (TTFT s, token ids, prompt tokens, prompt positions reused)."""
    from utils.generation_config import GenerationConfig

    config = GenerationConfig(top_k=1, max_length=pipeline.defaults.max_length, max_new_tokens=max_new_tokens)
    conversation = pipeline.conversation(image)
    turns = []
    for question in QUESTIONS:
        start = time.monotonic()  # the engine's request times are time.monotonic()
        turn = pipeline.chat(conversation, question, config, engine)
        for _ in turn:
            pass
        turns.append((turn.request.first_token_time - start, turn.token_ids, turn.prompt_length,
                      turn.request.cached_positions))
    return turns


def run(options, checkpoint: str, quant: int) -> dict:
    import torch

    from utils.engine import Engine
    from utils.cli import add_inference_args
    from utils.pipeline import load_pipeline
    from utils.vision import load_image

    torch.set_num_threads(options.threads)
    flags = ["--from_pretrained", checkpoint, "--max_length", str(options.max_length), "--device", "cpu"]
    if quant:
        flags += ["--quant", str(quant)]
    pipeline = load_pipeline(add_inference_args(argparse.ArgumentParser()).parse_args(flags))
    image, warm_up_image = load_image(IMAGE), load_image(WARM_UP_IMAGE)

    def engine(prefix_cache_gb):
        return Engine(pipeline.model, options.max_length, max_batch_size=options.max_batch_size,
                      eos_token_id=pipeline.processor.eos_token_id, prefix_cache_gb=prefix_cache_gb)

    warm = engine(None)
    chat(pipeline, warm, warm_up_image, options.max_new_tokens)
    warm.close()
    runs = {"cache": [], "no_cache": []}
    for _ in range(options.repeats):
        for name, budget in (("cache", None), ("no_cache", 0)):
            fresh = engine(budget)
            runs[name].append(chat(pipeline, fresh, image, options.max_new_tokens))
            fresh.close()
    result = {"quant": quant, "load": os.getloadavg()}
    for name, chats in runs.items():
        result[name] = {"ttft_s": [statistics.median(c[t][0] for c in chats) for t in range(len(QUESTIONS))],
                        "ttft_runs": [[c[t][0] for c in chats] for t in range(len(QUESTIONS))],
                        "prompt_tokens": [chats[0][t][2] for t in range(len(QUESTIONS))],
                        "reused_positions": [chats[0][t][3] for t in range(len(QUESTIONS))],
                        "tokens": [chats[0][t][1] for t in range(len(QUESTIONS))]}
    result["same_answers"] = result["cache"]["tokens"] == result["no_cache"]["tokens"]
    return result


def report(name: str, r: dict) -> None:
    cache, off = r["cache"], r["no_cache"]
    for t in range(len(QUESTIONS)):
        print(f"{name} turn {t + 1}: prompt {cache['prompt_tokens'][t]} tokens, {cache['reused_positions'][t]} reused; "
              f"TTFT {cache['ttft_s'][t]:.3f} s with the prefix cache (runs "
              f"{', '.join(f'{s:.3f}' for s in cache['ttft_runs'][t])}), {off['ttft_s'][t]:.3f} s without "
              f"(runs {', '.join(f'{s:.3f}' for s in off['ttft_runs'][t])})", flush=True)
    print(f"{name}: greedy answers with and without the cache {'equal' if r['same_answers'] else 'DIFFER'}; "
          f"turn-2 TTFT / turn-1 TTFT without the cache {off['ttft_s'][1] / off['ttft_s'][0]:.2f}x; "
          f"load average {r['load'][0]:.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", nargs="+", type=int, choices=[0, 4, 8], default=[0, 4],
                        help="0: fp32 weights (packed, as the front ends load them); 4 / 8: --quant")
    parser.add_argument("--config", default="M", help="bench/generate.py config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=640)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results here")
    options = parser.parse_args()

    from bench.serve import make_random_checkpoint

    work = tempfile.mkdtemp(prefix="cogvlm-chat-turns-")
    try:
        checkpoint = make_random_checkpoint(os.path.join(work, "random"), options.config)
        print(f"config {options.config}, {options.threads} torch threads, {options.max_new_tokens} tokens per answer, "
              f"{options.repeats} repeats; load average {os.getloadavg()}", flush=True)
        results = {}
        for quant in options.quant:
            name = {0: "fp32", 4: "int4", 8: "int8"}[quant]
            results[name] = run(options, checkpoint, quant)
            report(name, results[name])
        if options.json:
            with open(options.json, "w") as f:
                json.dump(results, f, indent=1)
        ratios = ", ".join(f"{r['cache']['ttft_s'][1] / r['cache']['ttft_s'][0]:.2f}x ({name})"
                           for name, r in results.items())
        print(f"turn-2 TTFT / turn-1 TTFT: {ratios}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
