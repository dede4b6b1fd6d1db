"""The compute kernels under the networks: what the CPU runs natively, and the products and attention built on it.

  cpu           CPU feature detection (AVX-512 VNNI, AMX, native bf16, x86), which picks the kernels below
  native        our C kernels (csrc/cpu_kernels.c: decode attention, int4 dequantization), built on first use
  linear        few-row products of plain float layers, and `KernelLinear`, the base of every layer that
                replaces a float linear with its weight kept in a kernel's own form
  packed        fp32 / bf16 weights packed for oneDNN or fbgemm (the front ends' float layers)
  quantization  int8 and int4 weights (`--quant 8 | 4`): `QuantizedLinear`, the low-bit layers
  attention     a prompt's attention and the one place that picks its kernel; what a SAT mask asks for

These modules import torch, SAT's model-parallel layers and models.errors only, never the networks, the
checkpoint layer or utils/ (tests/test_layering.py checks it). Import them by name, e.g.
`from models.kernels.quantization import quantize_model`.
"""
