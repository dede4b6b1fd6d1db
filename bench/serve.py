"""Serving benchmark: the real API server under concurrent clients, against offline batched generation.

    python bench/serve.py                          # config M, random weights, fp32, servers with batch 8 and 1
    python bench/serve.py --from_pretrained DIR --local_tokenizer TOK --concurrency 1 8 --max_tokens 32

Starts `openai_demo/openai_api.py` (one subprocess per --max_batch_size of --batch_sizes) and drives it with
the official `openai` client: at each concurrency C, C client threads each send --requests_per_client
streamed requests in a row (image + question, greedy, --max_tokens). Per row: requests/s and output
tokens/s over the level's wall time, time to first token (TTFT) p50/p95, time per output token (TPOT, a
request's (last token - first token) / (tokens - 1)) p50. Then, on the first server: TTFT of a request
that arrives while 7 others decode, against a lone request's TTFT on the idle server. Offline reference
(this process, same checkpoint and prompt): `generate_batch` of 8 prompts, output tokens / wall time
(prefill included), and a lone prefill.

Config M (bench/generate.py) is saved once with random weights and the golden tokenizer (1000 pieces).
Its LM head is zero except for the rows of 154 plain word pieces, so every generated token is a word (a
text delta at once: TTFT and TPOT are token times) and no end token ever wins: every answer has exactly
--max_tokens tokens. Speed does not depend on the weights' values.
"""
import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

GOLDEN_TOKENIZER = os.path.join(ROOT, "tests", "golden", "tiny-small", "tokenizer")
IMAGE = os.path.join(ROOT, "assets", "shapes.png")
QUESTION = "What shapes and colours are in this image?"
MODEL_NAME = "bench"


def make_random_checkpoint(out_dir: str, name: str = "M") -> str:
    """A bench/generate.py config (M) with random weights as a SAT checkpoint with its own tokenizer/ folder
    (see the docstring)."""
    import torch

    from generate import CONFIGS, build_model
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


def messages():
    with open(IMAGE, "rb") as f:
        uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]


def timed_request(client, max_tokens: int, stop_event=None, started=None):
    """One streamed request: dict(start, token_times, tokens). With stop_event, reads until it is set."""
    start = time.perf_counter()
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages(), temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **limit)
    token_times, tokens = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            token_times.append(time.perf_counter())
            if started is not None and len(token_times) == 2:
                started.release()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if stop_event is not None and stop_event.is_set():
            stream.close()
            break
    return {"start": start, "token_times": token_times, "tokens": tokens if tokens is not None else len(token_times)}


def run_level(url: str, concurrency: int, requests_per_client: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    results, errors = [], []

    def worker():
        try:
            for _ in range(requests_per_client):
                results.append(timed_request(client, max_tokens))
        except Exception as e:  # noqa: BLE001 - reported in the table
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"requests failed at concurrency {concurrency}: {errors[:3]}")
    ttft = [r["token_times"][0] - r["start"] for r in results]
    tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1) for r in results
            if len(r["token_times"]) > 1]
    return dict(concurrency=concurrency, requests=len(results), wall_s=wall, requests_per_s=len(results) / wall,
                tokens_per_s=sum(r["tokens"] for r in results) / wall, ttft_p50=percentile(ttft, 50),
                ttft_p95=percentile(ttft, 95), tpot_p50=statistics.median(tpot),
                tokens=sum(r["tokens"] for r in results))


def arrival(url: str, repeats: int) -> dict:
    """TTFT of a request arriving while 7 long requests decode, and of a lone request on the idle server."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    lone = [timed_request(client, 4) for _ in range(repeats)]
    stop, started, failed = threading.Event(), threading.Semaphore(0), []

    def decode_long():  # no max_tokens: the rest of the context
        try:
            timed_request(client, None, stop, started)
        except Exception as e:  # noqa: BLE001
            failed.append(repr(e))
            started.release()

    background = [threading.Thread(target=decode_long) for _ in range(7)]
    for thread in background:
        thread.start()
    for _ in background:
        started.acquire()  # each has 2 tokens: all 7 decode
    if failed:
        raise SystemExit(f"background requests failed: {failed[:2]}")
    arrived = [timed_request(client, 4) for _ in range(repeats)]
    health = json.loads(urllib.request.urlopen(url + "/health").read())
    stop.set()
    for thread in background:
        thread.join()
    first = [r["token_times"][0] - r["start"] for r in lone]
    joined = [r["token_times"][0] - r["start"] for r in arrived]
    return dict(lone_ttft=statistics.median(first), arrival_ttft=statistics.median(joined), lone_runs=first,
                arrival_runs=joined, running_during=health["running"])


def offline(options, checkpoint: str, batch: int = 8) -> dict:
    """generate_batch of `batch` copies of the clients' prompt in this process: output tok/s (prefill
    included), and the prefill (first token) of one prompt; medians of --offline_repeats."""
    import torch

    from utils.generation import GenerationConfig, generate_batch, generate_stream
    from utils.pipeline import add_inference_args, load_pipeline
    from utils.vision import load_image

    torch.set_num_threads(options.threads)
    flags = ["--from_pretrained", checkpoint, "--max_length", str(options.max_length), "--device", "cpu"]
    if options.local_tokenizer:
        flags += ["--local_tokenizer", options.local_tokenizer]
    pipeline = load_pipeline(add_inference_args(argparse.ArgumentParser()).parse_args(flags))
    prompt = pipeline.processor(pipeline.conversation(load_image(IMAGE)), QUESTION)
    config = GenerationConfig(top_k=1, max_length=options.max_length, max_new_tokens=options.max_tokens)
    generate_batch(pipeline.model, [prompt], config.replace(max_new_tokens=2))  # warm-up
    rates, prefills = [], []
    for _ in range(options.offline_repeats):
        start = time.perf_counter()
        outputs = generate_batch(pipeline.model, [prompt] * batch, config)
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
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[8, 1], help="servers' --max_batch_size")
    parser.add_argument("--requests_per_client", type=int, default=2)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (and offline run)")
    parser.add_argument("--arrival_repeats", type=int, default=3)
    parser.add_argument("--offline_repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    options = parser.parse_args()

    work = tempfile.mkdtemp(prefix="cogvlm-serve-bench-")
    try:
        checkpoint = options.from_pretrained or make_random_checkpoint(os.path.join(work, "random"), options.config)
        print(f"checkpoint {checkpoint}; {options.threads} torch threads; {options.max_tokens} tokens per "
              f"request; {options.requests_per_client} requests per client; load {os.getloadavg()}", flush=True)
        results = {"levels": {}, "load_before": os.getloadavg()}
        for max_batch_size in options.batch_sizes:
            server = Server(options, checkpoint, max_batch_size, work)
            try:
                run_level(server.url, 1, 1, 4)  # warm-up
                levels = results["levels"][max_batch_size] = []
                for concurrency in options.concurrency:
                    row = run_level(server.url, concurrency, options.requests_per_client, options.max_tokens)
                    levels.append(row)
                    print(f"max_batch_size {max_batch_size:2d} C {concurrency:2d}: {row['requests_per_s']:.3f} req/s "
                          f"{row['tokens_per_s']:6.1f} tok/s TTFT p50 {row['ttft_p50']:.2f} s p95 "
                          f"{row['ttft_p95']:.2f} s TPOT p50 {row['tpot_p50'] * 1000:.0f} ms", flush=True)
                if max_batch_size == options.batch_sizes[0] and max_batch_size >= 8:
                    results["arrival"] = arrival(server.url, options.arrival_repeats)
                    print(f"arrival while 7 decode: {results['arrival']}", flush=True)
            finally:
                server.stop()
        results["offline"] = offline(options, checkpoint)
        results["load_after"] = os.getloadavg()
        print(f"offline: {results['offline']}", flush=True)
        print_table(results, options)
        if options.json:
            with open(options.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: dict, options) -> None:
    print("\n| server --max_batch_size | clients | requests | req/s | output tok/s | TTFT p50 s | TTFT p95 s | TPOT p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for max_batch_size, levels in results["levels"].items():
        for row in levels:
            print(f"| {max_batch_size} | {row['concurrency']} | {row['requests']} | {row['requests_per_s']:.3f} | "
                  f"{row['tokens_per_s']:.1f} | {row['ttft_p50']:.2f} | {row['ttft_p95']:.2f} | "
                  f"{row['tpot_p50'] * 1000:.0f} |")
    offline_rate = results["offline"]["tokens_per_s"]
    print(f"\noffline generate_batch, batch 8: {offline_rate:.1f} tok/s (runs {results['offline']['rates']}); "
          f"lone prefill {results['offline']['prefill_s']:.2f} s; prompt {results['offline']['prompt_tokens']} tokens")
    levels = results["levels"]
    first = options.batch_sizes[0]

    def at(max_batch_size, concurrency):
        rows = [r for r in levels.get(max_batch_size, []) if r["concurrency"] == concurrency]
        return rows[0]["tokens_per_s"] if rows else None

    if at(first, 8) and at(1, 8):
        print(f"8 clients: batch-{first} server / batch-1 server = {at(first, 8) / at(1, 8):.2f}x (target >= 3x); "
              f"/ offline batch 8 = {at(first, 8) / offline_rate:.0%} (target >= 85%)")
    if "arrival" in results:
        a = results["arrival"]
        print(f"arrival while 7 decode: TTFT {a['arrival_ttft']:.2f} s vs lone TTFT {a['lone_ttft']:.2f} s "
              f"({a['arrival_ttft'] / a['lone_ttft']:.2f}x; target <= 2x) and lone offline prefill "
              f"{results['offline']['prefill_s']:.2f} s ({a['arrival_ttft'] / results['offline']['prefill_s']:.2f}x)")


if __name__ == "__main__":
    main()
