"""Serving benchmark: the real API server under a stream of requests, reported with vLLM's serving metrics,
against the batch-1 server and offline batched generation.

    python bench/serve.py                                    # config M, random weights, fp32, servers with batch 8 and 1
    python bench/serve.py --request-rate 0.5 --max-concurrency 8 --num-prompts 32 --result-file serve.json
    python bench/serve.py --from_pretrained DIR --local_tokenizer TOK --max-concurrency 1 8 --max_tokens 32

Starts `openai_demo/openai_api.py` (one subprocess per --max_batch_size of --batch_sizes) and drives it with the
official `openai` client, as vLLM's `benchmark_serving.py` drives a server: --num-prompts streamed requests
arrive at --request-rate per second (a Poisson process; inf: all at once), at most --max-concurrency of them
in flight (each value of that list is one run). Each request is one image + question (a distinct random 224 px
image per request, or with --same_prompt the same picture and question: then every prompt after the first is
reused from the prefix cache). Per run, in vLLM's names: `request_throughput`, `output_throughput` and
`total_token_throughput` over the run's duration, and mean / median / std / p99 of `ttft` (time to first
token), `tpot` (a request's (end - first token) / (tokens - 1)), `itl` (gaps between successive tokens) and
`e2el` (request start to its last token), in ms. Then, on the first server: TTFT of a request that arrives
while 7 others decode, against a lone request's TTFT on the idle server. Offline reference (this process, same
checkpoint and prompts): `generate_batch` of 8 prompts, output tokens / wall time (prefill included), and a
lone prefill. Results are written as JSON (--result-file).

Config M (bench/generate.py) is saved once with random weights and the golden tokenizer (1000 pieces).
Its LM head is zero except for the rows of 154 plain word pieces, so every generated token is a word (a
text delta at once: TTFT and TPOT are token times) and no end token ever wins: every answer has exactly
--max_tokens tokens. Speed does not depend on the weights' values.
"""
import argparse
import base64
import io
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOLDEN_TOKENIZER = os.path.join(ROOT, "tests", "golden", "tiny-small", "tokenizer")
IMAGE = os.path.join(ROOT, "assets", "shapes.png")
QUESTION = "What shapes and colours are in this image?"
MODEL_NAME = "bench"
IMAGE_SIZE = 224


def make_random_checkpoint(out_dir: str, name: str = "M") -> str:
    """A bench/generate.py config (M) with random weights as a SAT checkpoint with its own tokenizer/ folder
    (see the docstring)."""
    import torch

    from bench.generate import CONFIGS, build_model
    from models.checkpoint.sat_format import write_sat_checkpoint
    from models.config import CogVLMConfig
    from utils.language import llama2_tokenizer

    model, args = build_model(name, "fp32")
    tokenizer = llama2_tokenizer(GOLDEN_TOKENIZER, signal_type="chat")
    words = [i for i in range(len(tokenizer)) if (lambda piece: piece.startswith("\u2581") and len(piece) > 2 and
                                                  piece[1:].isalpha())(tokenizer.convert_ids_to_tokens(i))]
    with torch.no_grad():
        lm_head = model.get_mixin("lm").lm_head.weight
        kept = lm_head[words].clone()
        lm_head.zero_()
        lm_head[words] = kept * 50  # random-init logits are tiny: spread them so ties cannot happen
    cfg, eva = CONFIGS[name], CONFIGS[name]["eva"]
    patches = (eva["image_size"] // 14) ** 2
    config = CogVLMConfig.from_sat_dict({
        "model_class": "CogVLMModel", "num_layers": cfg["num_layers"], "hidden_size": cfg["hidden_size"],
        "num_attention_heads": cfg["num_attention_heads"], "vocab_size": cfg["vocab_size"],
        "inner_hidden_size": cfg["inner_hidden_size"], "layernorm_order": "pre", "use_bias": False,
        "max_sequence_length": args.max_sequence_length, "image_length": patches,
        "eva_args": dict(args.eva_args)}, f"config {name}")
    write_sat_checkpoint(out_dir, config, [model.state_dict()])
    shutil.copytree(GOLDEN_TOKENIZER, os.path.join(out_dir, "tokenizer"))
    return out_dir


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


class Server:
    """openai_api.py in a subprocess on a free port."""

    def __init__(self, options, checkpoint: str, max_batch_size: int, log_dir: str):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        flags = ["--from_pretrained", checkpoint, "--max_length", str(options.max_length), "--model_name", MODEL_NAME,
                 "--port", str(self.port), "--max_batch_size", str(max_batch_size), "--max_waiting", "256"]
        if options.prefix_cache_gb is not None:
            flags += ["--prefix_cache_gb", str(options.prefix_cache_gb)]
        if options.local_tokenizer:
            flags += ["--local_tokenizer", options.local_tokenizer]
        self.log_path = os.path.join(log_dir, f"server-batch{max_batch_size}.log")
        env = dict(os.environ, OMP_NUM_THREADS=str(options.threads), PYTHONUNBUFFERED="1")
        env.pop("COGVLM_API_KEY", None)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "openai_demo", "openai_api.py"), *flags],
                                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited:\n{open(self.log_path).read()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Prompt:
    """One request's image (PNG bytes) and question."""

    def __init__(self, png: bytes, question: str = QUESTION):
        self.png, self.question = png, question

    def messages(self):
        uri = "data:image/png;base64," + base64.b64encode(self.png).decode()
        return [{"role": "user", "content": [{"type": "text", "text": self.question},
                                             {"type": "image_url", "image_url": {"url": uri}}]}]

    def image(self):
        from PIL import Image

        return Image.open(io.BytesIO(self.png)).convert("RGB")


def make_prompts(count: int, same: bool, seed: int = 0):
    """`count` prompts: the shapes picture `count` times (same), or distinct random images."""
    import numpy as np
    from PIL import Image

    if same:
        with open(IMAGE, "rb") as f:
            return [Prompt(f.read())] * count
    generator = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(buffer, "PNG")
        prompts.append(Prompt(buffer.getvalue()))
    return prompts


def timed_request(client, prompt: Prompt, max_tokens: int, stop_event=None, started=None):
    """One streamed request: dict(start, token_times, tokens, prompt_tokens). With stop_event, reads until it is
    set."""
    start = time.perf_counter()
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    stream = client.chat.completions.create(model=MODEL_NAME, messages=prompt.messages(), temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **limit)
    token_times, tokens, prompt_tokens = [], None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            token_times.append(time.perf_counter())
            if started is not None and len(token_times) == 2:
                started.release()
        if chunk.usage is not None:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        if stop_event is not None and stop_event.is_set():
            stream.close()
            break
    return {"start": start, "token_times": token_times, "end": time.perf_counter(),
            "tokens": tokens if tokens is not None else len(token_times), "prompt_tokens": prompt_tokens or 0}


def run_level(url: str, prompts, request_rate: float, max_concurrency: int, max_tokens: int, seed: int = 0) -> dict:
    """vLLM's serving benchmark on `prompts`: arrivals at `request_rate` (Poisson; inf: at once), at most
    `max_concurrency` in flight (a request's clock starts when it gets its turn, as in vLLM)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    gaps = random.Random(seed)
    slots = threading.Semaphore(max_concurrency)
    results, errors = [], []

    def send(prompt):
        with slots:
            try:
                results.append(timed_request(client, prompt, max_tokens))
            except Exception as e:  # noqa: BLE001 - reported after the run
                errors.append(repr(e))

    threads = []
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        if index and math.isfinite(request_rate):
            time.sleep(gaps.expovariate(request_rate))
        threads.append(threading.Thread(target=send, args=(prompt,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    duration = time.perf_counter() - start
    if errors:
        raise SystemExit(f"requests failed at max_concurrency {max_concurrency}: {errors[:3]}")
    metrics = serving_metrics(results, duration)
    metrics.update(request_rate=request_rate, burstiness=1.0, max_concurrency=max_concurrency)
    return metrics


def serving_metrics(results, duration: float) -> dict:
    """vLLM's `benchmark_serving` result fields of finished requests (times in ms)."""
    ttft = [r["token_times"][0] - r["start"] for r in results if r["token_times"]]
    tpot = [(r["end"] - r["token_times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["token_times"]]
    itl = [later - earlier for r in results for earlier, later in zip(r["token_times"], r["token_times"][1:])]
    e2el = [r["end"] - r["start"] for r in results]
    output, prompt = sum(r["tokens"] for r in results), sum(r["prompt_tokens"] for r in results)
    metrics = dict(duration=duration, completed=len(results), total_input_tokens=prompt, total_output_tokens=output,
                   request_throughput=len(results) / duration, output_throughput=output / duration,
                   total_token_throughput=(prompt + output) / duration)
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        ms = [v * 1000 for v in values] or [float("nan")]
        metrics.update({f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
                        f"std_{name}_ms": statistics.pstdev(ms), f"p99_{name}_ms": percentile(ms, 99)})
    return metrics


def arrival(url: str, prompts, repeats: int) -> dict:
    """TTFT of a request arriving while 7 long requests decode, and of a lone request on the idle server (each
    with its own prompt: none of them reuses another's)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    prompts = iter(prompts)
    lone = [timed_request(client, next(prompts), 4) for _ in range(repeats)]
    stop, started, failed = threading.Event(), threading.Semaphore(0), []

    def decode_long(prompt):  # no max_tokens: the rest of the context
        try:
            timed_request(client, prompt, None, stop, started)
        except Exception as e:  # noqa: BLE001
            failed.append(repr(e))
            started.release()

    background = [threading.Thread(target=decode_long, args=(next(prompts),)) for _ in range(7)]
    for thread in background:
        thread.start()
    for _ in background:
        started.acquire()  # each has 2 tokens: all 7 decode
    if failed:
        raise SystemExit(f"background requests failed: {failed[:2]}")
    arrived = [timed_request(client, next(prompts), 4) for _ in range(repeats)]
    health = json.loads(urllib.request.urlopen(url + "/health").read())
    stop.set()
    for thread in background:
        thread.join()
    first = [r["token_times"][0] - r["start"] for r in lone]
    joined = [r["token_times"][0] - r["start"] for r in arrived]
    return dict(lone_ttft=statistics.median(first), arrival_ttft=statistics.median(joined), lone_runs=first,
                arrival_runs=joined, running_during=health["running"])


def offline(options, checkpoint: str, prompts, batch: int = 8) -> dict:
    """generate_batch of the first `batch` prompts in this process: output tok/s (prefill included), and the
    prefill (first token) of one prompt; medians of --offline_repeats."""
    import torch

    from utils.generation import generate_batch, generate_stream
    from utils.generation_config import GenerationConfig
    from utils.cli import add_inference_args
    from utils.pipeline import load_pipeline
    torch.set_num_threads(options.threads)
    flags = ["--from_pretrained", checkpoint, "--max_length", str(options.max_length), "--device", "cpu"]
    if options.local_tokenizer:
        flags += ["--local_tokenizer", options.local_tokenizer]
    pipeline = load_pipeline(add_inference_args(argparse.ArgumentParser()).parse_args(flags))
    inputs = [pipeline.processor(pipeline.conversation(p.image()), p.question) for p in prompts[:batch]]
    prompt = inputs[0]
    config = GenerationConfig(top_k=1, max_length=options.max_length, max_new_tokens=options.max_tokens)
    generate_batch(pipeline.model, [prompt], config.replace(max_new_tokens=2))  # warm-up
    rates, prefills = [], []
    for _ in range(options.offline_repeats):
        start = time.perf_counter()
        outputs = generate_batch(pipeline.model, inputs, config)
        rates.append(sum(len(o) for o in outputs) / (time.perf_counter() - start))
        start = time.perf_counter()
        next(generate_stream(pipeline.model, prompt, config))
        prefills.append(time.perf_counter() - start)
    return dict(tokens_per_s=statistics.median(rates), rates=rates, prefill_s=statistics.median(prefills),
                prefills=prefills, prompt_tokens=prompt["input_ids"].shape[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from_pretrained", default=None, help="checkpoint to serve (default: config M, random)")
    parser.add_argument("--local_tokenizer", default=None)
    parser.add_argument("--config", default="M", help="bench/generate.py config to build when no --from_pretrained")
    parser.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", nargs="+", type=int,
                        default=[1, 8], help="requests in flight at most; one run per value")
    parser.add_argument("--request-rate", "--request_rate", dest="request_rate", type=float, default=math.inf,
                        help="arrivals per second, a Poisson process (default inf: all at once)")
    parser.add_argument("--num-prompts", "--num_prompts", dest="num_prompts", type=int, default=16,
                        help="requests per run")
    parser.add_argument("--same_prompt", action="store_true",
                        help="every request the same picture and question (prefix reuse), not distinct random images")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[8, 1], help="servers' --max_batch_size")
    parser.add_argument("--prefix_cache_gb", type=float, default=None, help="the servers' --prefix_cache_gb")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (and offline run)")
    parser.add_argument("--arrival_repeats", type=int, default=3)
    parser.add_argument("--offline_repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="of the random images and the arrival times")
    parser.add_argument("--result-file", "--result_file", dest="result_file", default=None,
                        help="write the results here as JSON (default: bench-serve-<time>.json in this directory)")
    options = parser.parse_args()
    if options.request_rate <= 0 or min(options.max_concurrency) < 1 or options.num_prompts < 1:
        parser.error("--request-rate must be > 0, --max-concurrency and --num-prompts at least 1")
    result_file = options.result_file or f"bench-serve-{time.strftime('%Y%m%d-%H%M%S')}.json"

    work = tempfile.mkdtemp(prefix="cogvlm-serve-bench-")
    try:
        checkpoint = options.from_pretrained or make_random_checkpoint(os.path.join(work, "random"), options.config)
        prompts = make_prompts(options.num_prompts, options.same_prompt, options.seed)
        spare = make_prompts(8 + 2 * options.arrival_repeats, options.same_prompt, options.seed + 1)
        print(f"checkpoint {checkpoint}; {options.threads} torch threads; {options.num_prompts} requests of "
              f"{options.max_tokens} tokens per run at {options.request_rate} req/s; load {os.getloadavg()}", flush=True)
        results = {"runs": {}, "load_before": os.getloadavg(), "options": vars(options)}
        for max_batch_size in options.batch_sizes:
            server = Server(options, checkpoint, max_batch_size, work)
            try:
                run_level(server.url, spare[:1], math.inf, 1, 4)  # warm-up
                runs = results["runs"][max_batch_size] = []
                for concurrency in options.max_concurrency:
                    row = run_level(server.url, prompts, options.request_rate, concurrency, options.max_tokens,
                                    options.seed)
                    runs.append(row)
                    print(f"max_batch_size {max_batch_size:2d} max_concurrency {concurrency:2d}: "
                          f"{row['request_throughput']:.3f} req/s {row['output_throughput']:6.1f} tok/s, TTFT mean "
                          f"{row['mean_ttft_ms']:.0f} median {row['median_ttft_ms']:.0f} p99 {row['p99_ttft_ms']:.0f} ms, "
                          f"TPOT median {row['median_tpot_ms']:.0f} ms, ITL median {row['median_itl_ms']:.0f} ms, "
                          f"E2EL median {row['median_e2el_ms']:.0f} ms", flush=True)
                if max_batch_size == options.batch_sizes[0] and max_batch_size >= 8:
                    results["arrival"] = arrival(server.url, spare[1:], options.arrival_repeats)
                    print(f"arrival while 7 decode: {results['arrival']}", flush=True)
            finally:
                server.stop()
        results["offline"] = offline(options, checkpoint, prompts)
        results["load_after"] = os.getloadavg()
        print(f"offline: {results['offline']}", flush=True)
        print_table(results, options)
        partial = result_file + ".partial"
        with open(partial, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(partial, result_file)  # whole or absent
        print(f"results written to {result_file}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: dict, options) -> None:
    print("\n| server --max_batch_size | max concurrency | requests | request_throughput req/s | output_throughput "
          "tok/s | mean / median / p99 TTFT ms | median TPOT ms | median ITL ms | median E2EL ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for max_batch_size, runs in results["runs"].items():
        for row in runs:
            print(f"| {max_batch_size} | {row['max_concurrency']} | {row['completed']} | {row['request_throughput']:.3f} | "
                  f"{row['output_throughput']:.1f} | {row['mean_ttft_ms']:.0f} / {row['median_ttft_ms']:.0f} / "
                  f"{row['p99_ttft_ms']:.0f} | {row['median_tpot_ms']:.0f} | {row['median_itl_ms']:.0f} | "
                  f"{row['median_e2el_ms']:.0f} |")
    offline_rate = results["offline"]["tokens_per_s"]
    print(f"\noffline generate_batch, batch 8: {offline_rate:.1f} tok/s (runs {results['offline']['rates']}); "
          f"lone prefill {results['offline']['prefill_s']:.2f} s; prompt {results['offline']['prompt_tokens']} tokens")
    runs = results["runs"]
    first = options.batch_sizes[0]

    def at(max_batch_size, concurrency):
        rows = [r for r in runs.get(max_batch_size, []) if r["max_concurrency"] == concurrency]
        return rows[0]["output_throughput"] if rows else None

    if at(first, 8) and at(1, 8):
        print(f"8 in flight: batch-{first} server / batch-1 server = {at(first, 8) / at(1, 8):.2f}x (target >= 3x); "
              f"/ offline batch 8 = {at(first, 8) / offline_rate:.0%} (target >= 85%)")
    if "arrival" in results:
        a = results["arrival"]
        print(f"arrival while 7 decode: TTFT {a['arrival_ttft']:.2f} s vs lone TTFT {a['lone_ttft']:.2f} s "
              f"({a['arrival_ttft'] / a['lone_ttft']:.2f}x; target <= 2x) and lone offline prefill "
              f"{results['offline']['prefill_s']:.2f} s ({a['arrival_ttft'] / results['offline']['prefill_s']:.2f}x)")


if __name__ == "__main__":
    main()
