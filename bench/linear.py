"""One linear layer on CPU, every kernel torch offers for it side by side: fp32, bf16, int8, int4.

    python bench/linear.py                          # 2 threads, config M's MLP shape (1024 -> 2816), 1..283 rows
    python bench/linear.py --rows 1 8 --kernels bf16 int4
    python bench/linear.py --in_features 4096 --out_features 11008 --weights_mb 2048   # CogVLM-17B's MLP
    python bench/linear.py --torchao --compile      # + torchao's configs and an inductor-generated GEMV (slow to build)

Cycles through enough distinct weights (> last-level cache) that every product streams its weight from memory,
as decoding does. Prints ms per product and the bandwidth at which it reads its weight (bytes of the weight in
that format, scales included, / time). "*" marks what the front ends run for that row count
(models.kernels.quantization, models.kernels.packed). Decoding is 1-8 rows, a prefill's text and image tokens
tens to hundreds.
"""
import argparse
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GB = 1e9


def candidates(options):
    """{name: (family, x dtype, build(float weights, rows) -> (fn(x, i), bytes per product), used(rows))}."""
    import torch
    import torch.nn.functional as F

    from models.kernels import cpu, packed, quantization
    from models.kernels.linear import onednn_disabled

    f32, bf16 = torch.float32, torch.bfloat16

    def aten_gemv(x, w):
        with onednn_disabled():
            return F.linear(x, w)

    def plain(dtype, product):
        def build(weights, rows):
            ws = [w.to(dtype) for w in weights]
            return (lambda x, i: product(x, ws[i])), ws[0].numel() * ws[0].element_size()
        return build

    def quantized(layer_class, weights, dtype=f32):
        built = []
        for w in weights:
            layer = layer_class(w.shape[1], w.shape[0], False, dtype)
            layer.quantize_(w)
            built.append(layer)
        return built

    def layers(layer_class, dtype=f32):
        def build(weights, rows):
            built = quantized(layer_class, weights, dtype)
            return (lambda x, i: built[i](x)), built[0].weight_bytes()
        return build

    def int8pack(weights, rows):
        scales = [w.abs().amax(1) / 127 for w in weights]
        qs = [(w / s[:, None]).round().to(torch.int8) for w, s in zip(weights, scales)]
        sb = [s.bfloat16() for s in scales]
        return (lambda x, i: torch.ops.aten._weight_int8pack_mm(x, qs[i], sb[i])), weights[0].numel()

    def int4_kernel(group):
        def build(weights, rows):
            class Group(quantization.Int4WeightOnlyLinear):
                group_size = group
            built = quantized(Group, weights)
            return (lambda x, i: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, built[i].weight_int4, group, built[i].scales_and_zeros)), built[0].weight_bytes()
        return build

    def int4_dequantized(weights, rows):
        # bf16 GEMM where the CPU has bf16 instructions, else fp32 (what Int4WeightOnlyLinear does)
        dtype = bf16 if cpu.native_bf16() else f32
        built = quantized(quantization.Int4WeightOnlyLinear, weights)
        return (lambda x, i: torch.mm(x.to(dtype), built[i].dequantized_t(dtype))), built[0].weight_bytes()

    # "used": what the front ends run on this CPU; the MKL/oneDNN rows are what models.kernels.linear.linear picks
    # from for float layers left unpacked (training, model parallelism)
    bf16_layer, int8_layer = packed.packed_layer_class(bf16), quantization._int8_linear_class()
    table = {
        "fp32 oneDNN prepacked (PackedLinear)": ("fp32", f32, layers(packed.PackedLinear, f32), lambda r: True),
        "fp32 F.linear (MKL)": ("fp32", f32, plain(f32, F.linear), None),
        "fp32 W @ x^T (MKL)": ("fp32", f32, plain(f32, lambda x, w: torch.mm(w, x.t()).t()), None),
        "bf16 oneDNN prepacked (PackedLinear)": ("bf16", bf16, layers(packed.PackedLinear, bf16),
                                                 lambda r: bf16_layer is packed.PackedLinear),
        "bf16 F.linear (oneDNN)": ("bf16", bf16, plain(bf16, F.linear), None),
        "bf16 ATen GEMV (oneDNN off)": ("bf16", bf16, plain(bf16, aten_gemv), None),
        "bf16 as fp16, fbgemm (Fp16PackedLinear)": ("bf16", bf16, layers(packed.Fp16PackedLinear, bf16),
                                                    lambda r: bf16_layer is packed.Fp16PackedLinear),
        "int8 fbgemm dynamic": ("int8", f32, layers(quantization.Int8DynamicLinear),
                                lambda r: int8_layer is quantization.Int8DynamicLinear),
        "int8 weights only (Int8WeightOnlyLinear)": ("int8", f32, layers(quantization.Int8WeightOnlyLinear),
                                                     lambda r: int8_layer is quantization.Int8WeightOnlyLinear),
        "int8 _weight_int8pack_mm bf16": ("int8", bf16, int8pack, None),
        "int4 _weight_int4pack_mm g32": ("int4", bf16, int4_kernel(32),
                                         lambda r: r <= quantization.INT4_KERNEL_MAX_ROWS),
        "int4 _weight_int4pack_mm g128": ("int4", bf16, int4_kernel(128), None),
        "int4 dequantize + GEMM": ("int4", bf16, int4_dequantized,
                                        lambda r: r > quantization.INT4_KERNEL_MAX_ROWS),
    }
    if options.torchao:
        table.update(torchao_candidates())
    if options.compile:
        table["bf16 inductor GEMV (torch.compile)"] = ("bf16", bf16, compiled_gemv, None)
    return table


def torchao_candidates():
    """torchao's CPU configs (they dispatch to the aten kernels above or to plain matmuls)."""
    import torch
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, quantize_)

    def build_with(config, dtype):
        def build(weights, rows):
            mods = []
            for w in weights:
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(dtype)
                with torch.no_grad():
                    linear.weight.copy_(w)
                quantize_(linear, config())
                mods.append(linear)
            return (lambda x, i: mods[i](x)), w.numel()
        return build

    return {
        "torchao Int8WeightOnly": ("int8", torch.bfloat16, build_with(Int8WeightOnlyConfig, torch.bfloat16), None),
        "torchao Int8DynamicActInt8Weight": ("int8", torch.float32,
                                             build_with(Int8DynamicActivationInt8WeightConfig, torch.float32), None),
        "torchao Int4WeightOnly g32": ("int4", torch.bfloat16,
                                       build_with(lambda: Int4WeightOnlyConfig(group_size=32), torch.bfloat16), None),
    }


def compiled_gemv(weights, rows):
    """A GEMV written as a product and a sum, which inductor turns into one vectorized reduction."""
    import torch

    fn = torch.compile(lambda x, w: (w.float() * x.float()[:, None, :]).sum(-1).to(x.dtype), dynamic=False)
    ws = [w.bfloat16() for w in weights]
    return (lambda x, i: fn(x, ws[i])), ws[0].numel() * 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 128, 283])
    parser.add_argument("--in_features", type=int, default=1024)
    parser.add_argument("--out_features", type=int, default=2816)
    parser.add_argument("--weights_mb", type=int, default=512, help="total size of the fp32 weights cycled through")
    parser.add_argument("--kernels", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                        choices=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--torchao", action="store_true", help="also torchao's configs (pip install torchao)")
    parser.add_argument("--compile", action="store_true", help="also an inductor-generated bf16 GEMV")
    options = parser.parse_args()

    import torch

    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
    torch.set_num_threads(options.threads)
    fp32_bytes = options.in_features * options.out_features * 4
    generator = torch.Generator().manual_seed(0)
    weights = [torch.empty(options.out_features, options.in_features).normal_(0, 0.02, generator=generator)
               for _ in range(max(1, options.weights_mb * 2**20 // fp32_bytes))]
    print(f"{options.threads} threads, {options.in_features} -> {options.out_features}, {len(weights)} weights; "
          f"ms per product (GB/s of the weight as stored)")
    print(f"{'kernel':34}" + "".join(f"{f'{r} rows':>16}" for r in options.rows))
    for name, (family, dtype, build, used) in candidates(options).items():
        if family not in options.kernels:
            continue
        cells = []
        for rows in options.rows:
            try:
                fn, size = build(weights, rows)
                x = torch.randn(rows, options.in_features, generator=generator).to(dtype)
                seconds = time_per_product(fn, x, len(weights), repeats=3 if rows <= 32 else 1)
                mark = "*" if used is not None and used(rows) else " "
                cells.append(f"{seconds * 1e3:8.3f} ({size / seconds / GB:4.1f}){mark}")
            except Exception as e:  # a kernel this build or CPU lacks
                cells.append(f"{'n/a':>15} ")
                print(f"  {name}, {rows} rows: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        print(f"{name:34}" + "".join(f"{c:>16}" for c in cells), flush=True)
    print("* = what the front ends run for that row count (models.kernels.quantization)")


def time_per_product(fn, x, count: int, repeats: int = 3) -> float:
    for i in range(min(4, count)):
        fn(x, i)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(count):
            fn(x, i)
    return (time.perf_counter() - start) / (repeats * count)


if __name__ == "__main__":
    main()
