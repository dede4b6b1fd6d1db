"""Decode attention on CPU: one query per (row, head) over a KV cache, torch's kernels against ours.

    python bench/attention.py                      # config M's heads (16 x 64), 310 positions, batch 1 and 8
    python bench/attention.py --heads 32 --head_dim 128 --length 299   # CogVLM-17B

Cycles through one cache per layer (16 by default, more than the last-level cache holds at batch 8) so
that every call reads its keys and values from memory, as a decode step does. Prints us per layer and the
bandwidth at which the cache is read (bytes of keys and values / time). "ours" is models.kernels.native's kernel,
which models.kv_cache.cached_attention takes for one-query steps where it is built.
"""
import argparse
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=310, help="cached positions attended to")
    parser.add_argument("--layers", type=int, default=16, help="caches cycled through")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the layers (median)")
    options = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from models.kernels import native
    from models.kv_cache import KVCache

    torch.set_num_threads(options.threads)
    if not native.available():
        print("our kernel is not built on this machine (models.kernels.native logs why); torch's rows only")
    candidates = {
        "SDPA, fp32 cache": (torch.float32, lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        "SDPA, bf16 cache": (torch.bfloat16, lambda q, k, v: F.scaled_dot_product_attention(q.bfloat16(), k, v)),
    }
    if native.available():
        candidates["ours, fp32 cache"] = (torch.float32, lambda q, k, v: native.decode_attention(q, k, v, None))
        candidates["ours, bf16 cache"] = (torch.bfloat16, lambda q, k, v: native.decode_attention(q, k, v, None))
    print(f"{options.threads} threads, {options.heads} heads x {options.head_dim}, {options.length} positions, "
          f"{options.layers} caches; us per layer (GB/s of keys + values read)")
    print(f"{'kernel':20}" + "".join(f"{f'batch {b}':>20}" for b in options.batch))
    for name, (dtype, attend) in candidates.items():
        cells = []
        for batch in options.batch:
            caches = []
            for _ in range(options.layers):
                cache = KVCache(1, batch, options.heads, options.length + 64, options.head_dim, torch.float32, "cpu")
                caches.append(cache.buffer.normal_().to(dtype))
            query = torch.randn(batch, options.heads, 1, options.head_dim)
            views = [(buffer[0, 0][:, :, :options.length], buffer[0, 1][:, :, :options.length]) for buffer in caches]
            for key, value in views[:2]:
                attend(query, key, value)
            times = []
            for _ in range(options.repeats):
                start = time.perf_counter()
                for key, value in views:
                    attend(query, key, value)
                times.append((time.perf_counter() - start) / len(views))
            seconds = statistics.median(times)
            size = 2 * batch * options.heads * options.length * options.head_dim * torch.finfo(dtype).bits // 8
            cells.append(f"{seconds * 1e6:9.0f} ({size / seconds / 1e9:5.1f})")
        print(f"{name:20}" + "".join(f"{c:>20}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
