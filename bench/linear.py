"""Few-row fp32 linear layers on CPU: `F.linear(x, W)` against `models.linear.linear` (W @ x^T).

    python bench/linear.py                 # 2 threads, config M's MLP shape (1024 -> 2816)
    python bench/linear.py --threads 1 --rows 1 2 4 8 16 32
    python bench/linear.py --rows 1 8 --others          # + oneDNN and MKL-packed kernels
    python bench/linear.py --rows 1 8 --weights_mb 12   # one weight, cache-resident: compute only

Cycles through enough distinct weights (> last-level cache) that every product streams its weight
from memory, as decoding does. Prints ms per product and the weight-read bandwidth of each form.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--in_features", type=int, default=1024)
    parser.add_argument("--out_features", type=int, default=2816)
    parser.add_argument("--weights_mb", type=int, default=512, help="total size of the weights cycled through")
    parser.add_argument("--others", action="store_true",
                        help="also time oneDNN's linear (plain and prepacked weights) and MKL's packed GEMM")
    options = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from models.linear import MAX_TRANSPOSED_ROWS, MIN_TRANSPOSED_ROWS, linear

    torch.set_num_threads(options.threads)
    weight_bytes = options.in_features * options.out_features * 4
    weights = [torch.randn(options.out_features, options.in_features) * 0.02
               for _ in range(max(1, options.weights_mb * 2**20 // weight_bytes))]

    def time_per_product(fn, x, repeats=3):
        for w in weights[:4]:
            fn(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            for w in weights:
                fn(x, w)
        return (time.perf_counter() - start) / (repeats * len(weights))

    print(f"{options.threads} threads, {options.in_features} -> {options.out_features} fp32, "
          f"{len(weights)} weights; models.linear uses W @ x^T for {MIN_TRANSPOSED_ROWS}..{MAX_TRANSPOSED_ROWS} rows")
    print(f"{'rows':>4} {'F.linear ms':>11} {'GB/s':>6} {'W @ x^T ms':>10} {'GB/s':>6} {'speed-up':>8}")
    for rows in options.rows:
        x = torch.randn(rows, options.in_features)
        plain = time_per_product(lambda x, w: F.linear(x, w), x)
        transposed = time_per_product(lambda x, w: torch.mm(w, x.t()).t(), x)
        print(f"{rows:4d} {plain * 1e3:11.3f} {weight_bytes / plain / 1e9:6.1f} {transposed * 1e3:10.3f} "
              f"{weight_bytes / transposed / 1e9:6.1f} {plain / transposed:7.2f}x", flush=True)
        if options.others:
            time_other_kernels(weights, x, time_per_product, weight_bytes)
    # the library function itself, at the threshold
    x = torch.randn(MAX_TRANSPOSED_ROWS, options.in_features)
    print(f"models.linear.linear at {MAX_TRANSPOSED_ROWS} rows: {time_per_product(linear, x) * 1e3:.3f} ms")


def time_other_kernels(weights, x, time_per_product, weight_bytes):
    """The other fp32 CPU kernels torch ships for a linear layer. Only MKL's packed GEMM was faster for
    8 rows here (10-25% in some runs), and it needs a second, packed copy of every weight."""
    import torch

    rows = x.shape[0]
    onednn_packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights}
    mkl_packed = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights}
    kernels = {
        "oneDNN": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        "oneDNN prepacked": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, onednn_packed[id(w)], None, "none",
                                                                            [], ""),
        "MKL packed": lambda x, w: torch.ops.mkl._mkl_linear(x, mkl_packed[id(w)], w, None, rows),
    }
    for name, kernel in kernels.items():
        seconds = time_per_product(kernel, x)
        print(f"{'':4} {name:>18}: {seconds * 1e3:.3f} ms {weight_bytes / seconds / 1e9:6.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
