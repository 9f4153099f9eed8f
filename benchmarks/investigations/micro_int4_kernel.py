"""torch's int4 CPU kernel vs F.linear on SmolLM2's shapes, fp32 vs bf16 input: why the int4 path computes in bf16.

    flock /tmp/lowbit-bench.lock python benchmarks/investigations/micro_int4_kernel.py

Prints milliseconds per call (2 threads) for each (out, in) shape and batch M: fp32 F.linear, the int4 kernel with
fp32 input, with bf16 input, and a bf16 F.linear.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

GROUP = 64


def per_call_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps * 1e3


def shape_rows(n: int, k: int) -> None:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    pairs = torch.rand(k // GROUP, n, 2)
    pairs_bf16 = pairs.bfloat16()
    weight = torch.randn(n, k)
    weight_bf16 = weight.bfloat16()
    for m in (1, 8, 512):
        x = torch.randn(m, k)
        x_bf16 = x.bfloat16()
        reps = 200 if m < 512 else 5
        times = {
            "f32_linear": per_call_ms(lambda x=x: F.linear(x, weight), reps),
            "int4_f32_input": per_call_ms(lambda x=x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, pairs), reps),
            "int4_bf16_input": per_call_ms(
                lambda x_bf16=x_bf16: torch._weight_int4pack_mm_for_cpu(x_bf16, packed, GROUP, pairs_bf16), reps
            ),
            "bf16_linear": per_call_ms(lambda x_bf16=x_bf16: F.linear(x_bf16, weight_bf16), reps),
        }
        print(n, k, m, {name: round(ms, 3) for name, ms in times.items()}, flush=True)


def main() -> None:
    torch.set_num_threads(2)
    for n, k in ((1536, 576), (576, 1536), (576, 576)):
        shape_rows(n, k)


if __name__ == "__main__":
    main()
