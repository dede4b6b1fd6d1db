"""Generation benchmark: prefill latency, decode tokens/s, peak RSS, and the decode roofline.

    python bench/generate.py       # config M: fp32 and bf16, float / int8 / int4 weights, batch 1 and 8, + upstream
    python bench/generate.py --config tiny --dtype fp32 --quant 0 4 --batch 1
    python bench/generate.py --path ours --quant 0 --no_pack   # float weights through plain F.linear

Our float rows run the oneDNN-packed linears the front ends load (models.kernels.packed).

Ends with the ratios the speed targets are stated in (each variant against fp32 of the same run).

Random weights (speed does not depend on their values). Each row runs in its own
subprocess so that peak RSS is that run's own; "base" is the RSS after importing torch, SAT and our
modules, before the model exists, so RSS - base is what the model and its generation cost. The
roofline: decoding one token must read every language-expert weight once (plus the KV cache), so
tokens/s <= copy bandwidth / bytes per token.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    # the issue's config M: a scaled-down CogVLM with real vocabulary and image size
    "M": dict(num_layers=16, hidden_size=1024, num_attention_heads=16, inner_hidden_size=2816, vocab_size=32000,
              eva=dict(num_layers=4, hidden_size=1024, num_attention_heads=16, inner_hidden_size=4096, image_size=224)),
    # the released CogVLM-17B shapes (Vicuna-7B + visual expert, EVA2-CLIP-E at 490 px): GPU only
    "17B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, inner_hidden_size=11008, vocab_size=32000,
                eva=dict(num_layers=63, hidden_size=1792, num_attention_heads=16, inner_hidden_size=15360,
                         image_size=490)),
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=172, vocab_size=1000,
                 eva=dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=128, image_size=56)),
}


def build_model(name: str, dtype: str, device: str = "cpu", quant: int = None, pack: bool = False):
    """A random-weight model of config `name`. quant 8 or 4 (CPU): linear layers are swapped for empty
    quantized ones before any weight is written, as `--quant` loading does, so the float weights never exist.
    pack (CPU, no quant): the float linears are oneDNN-packed ones, as the front ends load them."""
    import torch
    from models import CogVLMModel
    from models.checkpoint.memory import trim_heap
    from models.kernels.linear import KernelLinear
    from models.kernels.packed import pack_linears
    from models.kernels.quantization import quantize_model

    cfg = CONFIGS[name]
    eva = cfg["eva"]
    patches = (eva["image_size"] // 14) ** 2
    args = CogVLMModel.get_args(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"], inner_hidden_size=cfg["inner_hidden_size"], layernorm_order="pre",
        use_bias=False, max_sequence_length=4096, image_length=patches, skip_init=True, mode="inference",
        model_parallel_size=1, device=device, fp16=False, bf16=dtype == "bf16",
        use_gpu_initialization=device == "cuda",  # SAT then allocates every weight on the GPU directly
        deepspeed=None,
        eva_args=dict(model_class="EVA2CLIPModel", num_layers=eva["num_layers"], hidden_size=eva["hidden_size"],
                      num_attention_heads=eva["num_attention_heads"], vocab_size=1, layernorm_order="post",
                      model_parallel_size=1, max_sequence_length=patches + 1,
                      inner_hidden_size=eva["inner_hidden_size"], use_final_layernorm=False, layernorm_epsilon=1e-6,
                      image_size=[eva["image_size"]] * 2, pre_len=1, post_len=0, in_channels=3, patch_size=14))
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = CogVLMModel(args, params_dtype=torch_dtype).to(device=device, dtype=torch_dtype).eval()  # as get_model
    if quant:
        quantize_model(model, quant, weights_loaded=False)
    elif pack and device == "cpu":
        pack_linears(model, weights_loaded=False)
    with torch.no_grad():  # skip_init leaves memory uninitialised: give it sane values
        generator = torch.Generator(device=device).manual_seed(0)
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
        for layer in model.modules():
            if isinstance(layer, KernelLinear):  # quantized or packed
                layer.quantize_(torch.empty(layer.out_features, layer.in_features).normal_(0, 0.02, generator=generator))
                trim_heap()  # as the loader does after each group: the float temporaries' heap memory goes back
    return model, args


def _decode_reads(name: str) -> bool:
    """Whether a decode step reads this weight: not the ViT, the adapter, the visual expert or the
    embedding table (one row of it)."""
    return not (name.startswith("mixins.eva.") or ".vision_" in name or name.startswith("transformer.word_embeddings"))


def weight_bytes(model, decode_only: bool = False) -> int:
    """Bytes of weights, quantized layers included (their packed weights are not parameters)."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not decode_only or _decode_reads(n))
    for name, module in model.named_modules():
        if hasattr(module, "weight_bytes") and (not decode_only or _decode_reads(name + ".")):
            total += module.weight_bytes()
    return total


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes read + written per second by a large tensor copy (the device's practical bandwidth):
    the median of `repeats` copies."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def _synchronize(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def prompt_batch(model, args, batch_size: int, text_tokens: int = 24):
    import torch
    from utils.generation import collate
    from models.inputs import rope_position_ids

    length = 1 + args.image_length + 2 + text_tokens
    prompt = {"input_ids": torch.randint(3, args.vocab_size, (1, length)), "image_embed_mask": torch.zeros(1, length, dtype=torch.long),
              "vision_expert_mask": torch.zeros(1, length, dtype=torch.long)}
    prompt["input_ids"][0, 0] = 1
    prompt["image_embed_mask"][0, 1:args.image_length + 3] = 1
    prompt["vision_expert_mask"][0, 1:args.image_length + 2] = 1
    rope = torch.zeros(1, length, dtype=torch.long)
    rope[0, 2:args.image_length + 2] = 1
    prompt["position_ids"] = rope_position_ids(rope)
    size = args.eva_args["image_size"][0]
    images = torch.randn(batch_size, 3, size, size)
    return collate([prompt] * batch_size), images


def run_ours(model, args, batch_size: int, new_tokens: int):
    import torch
    from utils.generation import generate_batch_stream
    from utils.generation_config import GenerationConfig

    batch, images = prompt_batch(model, args, batch_size)
    batch["images"] = images
    config = GenerationConfig(max_length=batch["input_ids"].shape[1] + new_tokens, top_k=1, end_token_ids=[])
    stream = generate_batch_stream(model, batch, config)
    start = time.perf_counter()
    next(stream)  # prefill + first token
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    steps = sum(1 for _ in stream)
    decode = time.perf_counter() - start
    return prefill, steps * batch_size / decode, batch["input_ids"].shape[1]


def run_upstream(model, args, batch_size: int, new_tokens: int):
    """The original chat() path: SAT's filling_sequence + CachedAutoregressiveMixin, batch of one."""
    import torch
    from sat.generation.autoregressive_sampling import filling_sequence
    from sat.generation.sampling_strategies import BaseStrategy
    from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin

    if batch_size != 1:
        raise SystemExit("the upstream path generates one sequence at a time")
    if next(model.parameters()).device.type != "cpu":
        raise SystemExit("the upstream path is timed on CPU only (its per-forward timestamps do not synchronize)")
    if "kv-cache" in model.mixins:
        model.del_mixin("kv-cache")
    if "auto-regressive" not in model.mixins:
        model.add_mixin("auto-regressive", CachedAutoregressiveMixin())
    batch, images = prompt_batch(model, args, 1)
    length = batch["input_ids"].shape[1]
    seq = torch.cat([batch["input_ids"][0], torch.full((new_tokens,), -1)])
    positions = torch.cat([batch["position_ids"][0], batch["position_ids"][0, -1] + torch.arange(1, new_tokens + 1)])

    def masks_and_positions(sequence):
        total = len(sequence)
        return sequence.unsqueeze(0), torch.ones(1, 1, total, total).tril(), positions.unsqueeze(0)

    timings = []

    def timed_forward(*a, **kw):
        timings.append(time.perf_counter())
        return original_forward(*a, **kw)

    original_forward = model.forward
    model.forward = timed_forward
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    with torch.no_grad():
        filling_sequence(model, seq, batch_size=1, strategy=BaseStrategy(temperature=0.8, top_k=1, top_p=0.4),
                         get_masks_and_position_ids=masks_and_positions,
                         images=images.to(dtype), vision_expert_mask=batch["vision_expert_mask"],
                         image_embed_mask=batch["image_embed_mask"])
    end = time.perf_counter()
    prefill = timings[1] - start
    return prefill, (len(timings) - 1) / (end - timings[1]), length


def child(options):
    import torch
    from models.kv_cache import cache_dtype
    from models.kernels.quantization import has_low_bit_weights

    torch.set_num_threads(options.threads)
    options.dtype, options.path, options.batch, options.quant = (options.dtype[0], options.path[0], options.batch[0],
                                                                  options.quant[0])
    import models  # noqa: F401  (torch, SAT, DeepSpeed, transformers: the baseline every process pays)
    import utils.chat  # noqa: F401
    baseline_rss = proc_status_bytes("VmRSS")
    model, args = build_model(options.config, options.dtype, options.device, options.quant,
                              pack=options.path == "ours" and not options.no_pack)
    weights = weight_bytes(model, decode_only=True)
    run = run_upstream if options.path == "upstream" else run_ours
    # warm-up at the timed runs' shapes: oneDNN primitive caches, and heap memory for a KV cache of the timed
    # length (a shorter warm-up left the first timed prefill touching fresh pages of its larger cache)
    run(model, args, options.batch, options.new_tokens)
    load_before = os.getloadavg()[0]
    # this VM's speed drifts by +-15% between runs: report the median of several
    runs = [run(model, args, options.batch, options.new_tokens) for _ in range(options.repeats)]
    prefill = statistics.median(r[0] for r in runs)
    tokens_per_s = statistics.median(r[1] for r in runs)
    prompt_length = runs[0][2]
    first = model.transformer.layers[0].attention
    param = next(model.parameters())
    kv_bytes = (2 * len(model.transformer.layers) * first.hidden_size_per_attention_head
                * first.num_attention_heads_per_partition * cache_dtype(param.dtype, param.device, has_low_bit_weights(model)).itemsize
                * (prompt_length + options.new_tokens // 2))  # mean cache length over the decode
    model_bytes = weight_bytes(model)
    cache_bytes = kv_bytes * (prompt_length + options.new_tokens) // (prompt_length + options.new_tokens // 2)
    # on CUDA: peak GPU memory allocated by torch (nothing is allocated before the model)
    peak = torch.cuda.max_memory_allocated() if options.device == "cuda" else proc_status_bytes("VmHWM")
    print(json.dumps(dict(prefill_s=prefill, tokens_per_s=tokens_per_s, prompt_length=prompt_length,
                          weight_bytes_per_token=weights, kv_bytes_per_row=kv_bytes, model_bytes=model_bytes,
                          cache_bytes=cache_bytes * options.batch,
                          peak_rss_bytes=peak,
                          baseline_rss_bytes=0 if options.device == "cuda" else baseline_rss,
                          tokens_per_s_runs=[r[1] for r in runs],
                          # 1-minute load average before and after the timed runs (this row adds ~threads)
                          load_average=sorted([load_before, os.getloadavg()[0]]),
                          # measured here, after the runs (its 1 GB of buffers would otherwise be the peak)
                          copy_bandwidth_gbs=copy_bandwidth_gbs(device=options.device))))


def proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux).

    Not `getrusage`'s ru_maxrss: Linux carries it over exec from the forking parent, so a child would
    report the parent's peak (this script's 1 GB bandwidth buffers) when that is higher than its own.
    Elsewhere falls back to ru_maxrss.
    """
    try:
        with open("/proc/self/status") as status:
            return int(status.read().split(field + ":")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="M", choices=sorted(CONFIGS))
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--path", nargs="+", default=["ours", "upstream"], choices=["ours", "upstream"])
    parser.add_argument("--quant", nargs="+", type=int, choices=[0, 8, 4], default=[0, 8, 4],
                        help="0 = float weights, 8 = int8, 4 = int4 linear layers (quantized: ours only)")
    parser.add_argument("--no_pack", action="store_true",
                        help="ours with plain F.linear float weights instead of the front ends' oneDNN-packed ones")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every row is run, in a fresh process each, interleaved with the other rows "
                             "(median over all runs reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: weights built on the GPU, roofline from its copy bandwidth, memory = peak "
                             "GPU memory (e.g. --device cuda --config 17B --dtype bf16 --path ours)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child(options)

    rows = [(path, dtype, quant, batch) for dtype in options.dtype for quant in options.quant for path in options.path
            for batch in options.batch if not (path == "upstream" and (batch != 1 or quant))]
    # This VM's speed drifts (copy bandwidth 24-55 GB/s within an hour): every round runs each row once, so
    # that a slow spell touches all rows alike instead of the rows that happened to run during it.
    runs = {row: [] for row in rows}
    for round_index in range(options.rounds):
        for row in rows:
            r = run_child(options, row[1], row[2], row[0], row[3])
            if r is not None:
                runs[row].append(r)
        print(f"round {round_index + 1} of {options.rounds} done", flush=True)
    results = {row: combine(found) for row, found in runs.items() if found}
    print(f"config {options.config}; device {options.device}; {options.threads} threads; median of {options.rounds} "
          f"rounds x {options.repeats} run(s), each row in a fresh process per round (tok/s range in brackets); "
          f"copy bandwidth (read + write) measured in each row's process; load = the machine's 1-minute load average around the timed runs (this row itself adds about {options.threads})"
          + ("; memory columns = peak GPU memory" if options.device == "cuda" else ""))
    print(f"{'path':9} {'dtype':5} {'quant':5} {'batch':>5} {'prefill s':>9} {'tok/s':>8} {'(range)':>15} {'GB/s':>5} "
          f"{'roofline':>8} {'of roof':>7} {'RSS GB':>7} {'base GB':>7} {'model GB':>8} {'RSS-base / model+cache':>22} "
          f"{'load':>9}")
    for (path, dtype, quant, batch), r in results.items():
        print_row(path, dtype, quant, batch, r)
    print_ratios(results, options.batch)


def combine(found):
    """One row's results over its rounds: medians of the speeds, the largest peak RSS, every run's tok/s."""
    merged = dict(found[0])
    for key in ("prefill_s", "tokens_per_s", "copy_bandwidth_gbs"):
        merged[key] = statistics.median(r[key] for r in found)
    merged["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in found)
    merged["tokens_per_s_runs"] = [t for r in found for t in r["tokens_per_s_runs"]]
    merged["load_average"] = [min(r["load_average"][0] for r in found), max(r["load_average"][1] for r in found)]
    return merged


def run_child(options, dtype: str, quant: int, path: str, batch: int):
    """One row, measured in a fresh process: its JSON result, or None (the failure printed)."""
    cmd = [sys.executable, __file__, "--child", "--config", options.config, "--dtype", dtype, "--quant", str(quant),
           "--batch", str(batch), "--path", path, "--new_tokens", str(options.new_tokens),
           "--threads", str(options.threads), "--repeats", str(options.repeats), "--device", options.device]
    cmd += ["--no_pack"] if options.no_pack else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(f"{path} {dtype} quant {quant} batch {batch} failed:\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_row(path: str, dtype: str, quant: int, batch: int, r: dict) -> None:
    # one step reads the weights once for the whole batch, plus every row's cache
    step_bytes = r["weight_bytes_per_token"] + batch * r["kv_bytes_per_row"]
    roofline = r["copy_bandwidth_gbs"] * 1e9 / step_bytes * batch
    spread = f"({min(r['tokens_per_s_runs']):.1f}-{max(r['tokens_per_s_runs']):.1f})"
    print(f"{path:9} {dtype:5} {str(quant or '-'):5} {batch:5d} {r['prefill_s']:9.2f} "
          f"{r['tokens_per_s']:8.1f} {spread:>15} {r['copy_bandwidth_gbs']:5.1f} {roofline:8.1f} "
          f"{r['tokens_per_s'] / roofline:7.0%} "
          f"{r['peak_rss_bytes'] / 1e9:7.2f} {r['baseline_rss_bytes'] / 1e9:7.2f} "
          f"{r['model_bytes'] / 1e9:8.2f} "
          f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / (r['model_bytes'] + r['cache_bytes']):21.2f}x "
          f"{r['load_average'][0]:4.1f}-{r['load_average'][1]:<4.1f}", flush=True)


def print_ratios(results: dict, batches) -> None:
    """Each of our rows against our fp32 rows of this run: decode tokens/s and prefill time at the smallest
    batch, and the largest batch's tokens/s over the smallest's."""
    small, large = min(batches), max(batches)
    reference = results.get(("ours", "fp32", 0, small))
    variants = list(dict.fromkeys((d, q) for (p, d, q, _) in results if p == "ours"))  # in the order run
    if reference is None or not variants:
        return
    print(f"\nratios (ours): decode b{small} / fp32 b{small}, prefill / fp32 prefill (b{small}), b{large} / b{small}")
    for dtype, quant in variants:
        row, wide = results.get(("ours", dtype, quant, small)), results.get(("ours", dtype, quant, large))
        if row is None:
            continue
        scale = f"{wide['tokens_per_s'] / row['tokens_per_s']:6.2f}x" if wide and large != small else "     -"
        print(f"{dtype:5} {str(quant or '-'):5} decode {row['tokens_per_s'] / reference['tokens_per_s']:5.2f}x  "
              f"prefill {row['prefill_s'] / reference['prefill_s']:5.2f}x  b{large}/b{small} {scale}")

if __name__ == "__main__":
    main()
