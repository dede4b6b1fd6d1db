"""CogVLM-17B on a CPU box: peak memory, load time, prefill and decoding with `--quant 8` and `--quant 4`.

    python bench/big_model.py --dir /work/tmp-cogvlm17b          # write the checkpoint, run int8 and int4, delete it
    python bench/big_model.py --dir DIR --keep --quant 4         # keep the checkpoint for another run

1. Writes a random-weight HF-format checkpoint of the released CogVLM-17B shape (LLM 32
   layers x 4096, 32 heads, MLP 11008, vocab 32000, a visual expert in every layer; EVA2-CLIP-E 63 layers x
   1792, 16 heads, MLP 15360; 224 px here) in bf16, one safetensors shard at a time (~35 GB on disk; only
   one shard is ever in memory). Checks free disk and memory first.
2. For each `--quant`, in a fresh process: loads it through the project's loader
   (`models.checkpoint.load_model(dir, dtype=bf16, quant=bits)`: the linear layers are swapped for empty
   quantized ones before loading and each quantizes its tensor as it streams in), then times the prefill
   of a 224 px image prompt and greedy decoding, and a 2-turn chat through the serving engine (utils/engine.py,
   default prefix cache): turn 2 is turn 1's prompt and answer plus a new question, built at token level (the
   random-weight model's answers are not text), so its time to first token is that of a reused prefix. Reports the RSS after imports (base), after building the
   model without its weights (SAT's skip_init leaves them as untouched `torch.empty` pages, which cost no
   RSS), the peak (VmHWM) against quantized weights + KV cache + base, and decode tokens/s against the
   roofline (copy bandwidth / bytes one step reads).
3. Deletes the checkpoint it wrote unless --keep (an existing --dir is used as it is and kept).
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from bench.generate import copy_bandwidth_gbs, proc_status_bytes, run_ours, weight_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "17B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, vocab_size=32000, inner_hidden_size=11008,
                vision=dict(num_layers=63, hidden_size=1792, num_attention_heads=16, inner_hidden_size=15360,
                            image_size=224)),
    # the same steps in seconds (tests/test_bench.py)
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000, inner_hidden_size=172,
                 vision=dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=128,
                             image_size=56)),
}
SHARD_BYTES = 2 * 10**9
GB = 1e9


def big_config(name: str = "17B"):
    from models.config import CogVLMConfig, VisionConfig

    shape = SHAPES[name]
    return CogVLMConfig(**{**shape, "vision": VisionConfig(**shape["vision"])}, template="base")


def checkpoint_bytes(config) -> int:
    from models.checkpoint.layout import tensor_table

    return sum(2 * _numel(spec.shape) * len(spec.hf_keys) for spec in tensor_table(config))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_checkpoint(directory: str, name: str) -> None:
    """The random bf16 checkpoint, written shard by shard (values N(0, 0.02): speed does not depend on them)."""
    import torch
    from tqdm import tqdm

    from models.checkpoint.hf_format import write_hf_checkpoint
    from models.checkpoint.layout import ROTARY_KEY, tensor_table
    from models.checkpoint.hf_format import rotary_inv_freq

    config = big_config(name)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for spec in tqdm(tensor_table(config), desc=f"writing the {name} checkpoint", unit="tensor"):
            if spec.sat_key == ROTARY_KEY:
                tensor = rotary_inv_freq(config)
            elif len(spec.shape) == 1 and spec.sat_key.endswith("layernorm.weight"):
                tensor = torch.ones(spec.shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(spec.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            for hf_key in spec.hf_keys:
                yield hf_key, tensor

    write_hf_checkpoint(directory, config.to_hf_dict(torch.bfloat16), tensors(), max_shard_bytes=SHARD_BYTES)


def child(options) -> None:
    import torch

    torch.set_num_threads(options.threads)
    from models.checkpoint import load_model
    from models.kv_cache import cache_dtype

    base = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    built, _ = load_model(options.dir, dtype=torch.bfloat16, build_only=True)
    build_s = time.perf_counter() - start
    built_rss = proc_status_bytes("VmRSS")
    del built
    gc.collect()  # SAT's modules hold reference cycles (mixins <-> transformer)
    start = time.perf_counter()
    with PeakSampler() as during_load:
        model, args = load_model(options.dir, dtype=torch.bfloat16, quant=options.quant[0])
    load_s = time.perf_counter() - start
    loaded = dict(rss=proc_status_bytes("VmRSS"), peak=proc_status_bytes("VmHWM"), anon=proc_status_bytes("RssAnon"),
                  file=proc_status_bytes("RssFile"), peak_anon=during_load.peak["RssAnon"],
                  peak_file=during_load.peak["RssFile"])
    runs = [run_ours(model, args, 1, options.new_tokens) for _ in range(options.repeats)]
    chat = chat_ttft(model, args, options.new_tokens)
    prompt_length = runs[0][2]
    length = prompt_length + options.new_tokens
    # keys and values of every layer, as the cache stores them (models.kv_cache.cache_dtype)
    kv_bytes = 2 * args.num_layers * args.hidden_size * length * cache_dtype(torch.bfloat16, "cpu").itemsize
    print(json.dumps(dict(
        base_rss=base, built_rss=built_rss, build_s=build_s, load_s=load_s, loaded=loaded,
        peak_rss=proc_status_bytes("VmHWM"), model_bytes=weight_bytes(model), kv_bytes=kv_bytes,
        decode_bytes=weight_bytes(model, decode_only=True) + kv_bytes * (prompt_length + options.new_tokens // 2)
        // length, prompt_length=prompt_length, image_size=args.eva_args["image_size"][0], prefill_s=[r[0] for r in runs], tokens_per_s=[r[1] for r in runs],
        copy_bandwidth_gbs=copy_bandwidth_gbs(), chat=chat)))


def chat_ttft(model, args, new_tokens: int, question_tokens: int = 12) -> dict:
    """Two chat turns through the serving engine (prefix cache on): each turn's time to first token (submit to
    first token) and the prompt positions the engine reused."""
    import torch

    from bench.generate import prompt_batch
    from utils.engine import Engine
    from utils.generation import PROMPT_KEYS
    from utils.generation_config import GenerationConfig

    batch, images = prompt_batch(model, args, 1)
    first = {key: batch[key] for key in PROMPT_KEYS}
    first["images"] = images
    engine = Engine(model, first["input_ids"].shape[1] + 2 * new_tokens + question_tokens + 8, max_batch_size=1)
    config = GenerationConfig(top_k=1, max_new_tokens=new_tokens, end_token_ids=[])
    turns = []
    inputs = first
    for turn in range(2):
        request = engine.submit(inputs, config)
        answer = list(request)
        turns.append(dict(ttft_s=request.first_token_time - request.submit_time, prompt=inputs["input_ids"].shape[1],
                          reused=request.cached_positions))
        # the next turn: this prompt, its answer and a new question (text tokens: language expert, no image)
        added = torch.tensor([answer + torch.randint(3, args.vocab_size, (question_tokens,)).tolist()])
        start = int(inputs["position_ids"][0, -1]) + 1
        inputs = dict(inputs, input_ids=torch.cat([inputs["input_ids"], added], 1),
                      position_ids=torch.cat([inputs["position_ids"], torch.arange(start, start + added.shape[1])[None]], 1),
                      image_embed_mask=torch.cat([inputs["image_embed_mask"], torch.zeros_like(added)], 1),
                      vision_expert_mask=torch.cat([inputs["vision_expert_mask"], torch.zeros_like(added)], 1))
    engine.close()
    return dict(turns=turns, ratio=turns[1]["ttft_s"] / turns[0]["ttft_s"])


class PeakSampler:
    """The largest RssAnon (memory of our own) and RssFile (file pages mapped, e.g. safetensors' mmap: the kernel
    may drop them) seen while the block runs, sampled every 50 ms; VmHWM counts both."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()

    def _sample(self):
        while True:
            for field in self.peak:
                self.peak[field] = max(self.peak[field], proc_status_bytes(field))
            if self._stop.wait(0.05):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for field in self.peak:
            self.peak[field] = max(self.peak[field], proc_status_bytes(field))


def report(bits: int, r: dict) -> None:
    quantized = r["model_bytes"] + r["kv_bytes"]
    bound = 1.15 * quantized + r["base_rss"]
    roofline = r["copy_bandwidth_gbs"] * GB / r["decode_bytes"]
    print(f"--quant {bits}: base {r['base_rss'] / GB:.2f} GB, built (no weights) {r['built_rss'] / GB:.2f} GB in "
          f"{r['build_s']:.1f} s, loaded in {r['load_s']:.0f} s; after loading RSS {r['loaded']['rss'] / GB:.2f} GB "
          f"(anon {r['loaded']['anon'] / GB:.2f}, file {r['loaded']['file'] / GB:.2f}; largest while loading: anon "
          f"{r['loaded']['peak_anon'] / GB:.2f}, file {r['loaded']['peak_file'] / GB:.2f}), peak {r['peak_rss'] / GB:.2f} GB "
          f"= {r['peak_rss'] / 2**30:.2f} GiB; quantized weights {r['model_bytes'] / GB:.2f} GB + KV cache "
          f"{r['kv_bytes'] / GB:.2f} GB; (peak - base) / (weights + cache) = "
          f"{(r['peak_rss'] - r['base_rss']) / quantized:.3f}x (target <= 1.15x: peak <= {bound / GB:.2f} GB)")
    print(f"  prompt {r['prompt_length']} tokens ({r['image_size']} px image): prefill {', '.join(f'{s:.1f}' for s in r['prefill_s'])} s; "
          f"decode {', '.join(f'{t:.2f}' for t in r['tokens_per_s'])} tok/s; roofline {roofline:.2f} tok/s "
          f"({r['decode_bytes'] / GB:.2f} GB per step at {r['copy_bandwidth_gbs']:.1f} GB/s copy bandwidth): "
          f"{max(r['tokens_per_s']) / roofline:.0%} of it", flush=True)
    turns = r["chat"]["turns"]
    print(f"  chat through the engine: turn-1 TTFT {turns[0]['ttft_s']:.1f} s ({turns[0]['prompt']} tokens), turn-2 TTFT "
          f"{turns[1]['ttft_s']:.2f} s ({turns[1]['reused']} of {turns[1]['prompt']} positions reused): "
          f"turn-2 / turn-1 {r['chat']['ratio']:.3f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="where the checkpoint is written (or already is)")
    parser.add_argument("--shape", default="17B", choices=sorted(SHAPES))
    parser.add_argument("--quant", nargs="+", type=int, choices=[8, 4], default=[8, 4])
    parser.add_argument("--keep", action="store_true", help="do not delete the checkpoint afterwards")
    parser.add_argument("--write_only", action="store_true", help="write the checkpoint and stop (implies --keep)")
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="prefill + decode runs per load")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child(options)

    size = checkpoint_bytes(big_config(options.shape))
    written = not os.path.isdir(options.dir)
    if written:
        parent = os.path.dirname(os.path.abspath(options.dir))
        free = shutil.disk_usage(parent).free
        if free < size * 1.1:
            raise SystemExit(f"error: the checkpoint needs {size / GB:.1f} GB on disk, {parent} has {free / GB:.1f} GB "
                             "free; pass --dir on a larger disk")
        start = time.perf_counter()
        write_checkpoint(options.dir, options.shape)
        print(f"wrote {size / GB:.1f} GB to {options.dir} in {time.perf_counter() - start:.0f} s", flush=True)
    if options.write_only:
        return
    try:
        for bits in options.quant:
            with open("/proc/meminfo") as f:
                available = int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
            # quantized linear weights (+ int4's scales), float embeddings and norms, cache and activations
            needed = size / 2 * (1 if bits == 8 else 0.66) + 2 * GB
            print(f"--quant {bits}: {available / GB:.1f} GB of memory available before loading", flush=True)
            if available < needed:
                print(f"--quant {bits} skipped: it needs about {needed / GB:.1f} GB; run it when the machine is quieter")
                continue
            cmd = [sys.executable, __file__, "--child", "--dir", options.dir, "--quant", str(bits), "--new_tokens",
                   str(options.new_tokens), "--repeats", str(options.repeats), "--threads", str(options.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"--quant {bits} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
                continue
            report(bits, json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if written and not options.keep:
            shutil.rmtree(options.dir, ignore_errors=True)
            print(f"deleted {options.dir}")


if __name__ == "__main__":
    main()
