#!/usr/bin/env python3
"""An ESTIMATED cloud latency profile for a GPU, from public hardware figures and the model's shape.

No GPU was available to measure one (`scripts/bench_cloud.py --profile`), so this derives the same
JSON the simulator loads (edge/simulation/cloud_latency.py) from a roofline model, marked
`"estimated": true`, with every input, formula and number inside the file:

    python scripts/gpu_profile.py --out docs/gpu_profile_h200_1.5b_estimated.json

The model (one forward pass of S sessions, each feeding n new tokens on a cache of c tokens):

    W   = P_read * b                     bytes of weights read once per pass
    kv  = 2 * layers * kv_heads * head_dim * b_kv        KV-cache bytes per token
    F(c) = 2 * P_read + 4 * layers * heads * head_dim * c   FLOPs per new token (matmuls + attention)
    T(S, n, c) = overhead + max((W + S * (c + n) * kv) / (eff_bw * BW),  S * n * F(c + n/2) / (eff_flops * FLOPS))

P_read is every parameter a forward pass reads (all but the input embedding table, from which it
reads one row per token; with tied embeddings the output layer reads that matrix once). A decode
step (n = 1) is bandwidth-bound: the weights are read once per pass whatever S, so batching
amortizes them. A check point or a prefill of n tokens costs the same as one decode step until
S * n reaches the roofline crossover, (W / (eff_bw * BW)) / (F / (eff_flops * FLOPS)) tokens per
pass (about (eff_flops * FLOPS) / (eff_bw * BW) * b / 2: ~150 here), and grows linearly beyond.
Device seconds per session = T / S (the simulator divides by sessions).

The defaults are the default cloud model (Qwen2.5-Coder-1.5B-Instruct, shape from its GGUF's
metadata) served in bf16 on an NVIDIA H200 (HBM3e 4.8 TB/s; 989 TFLOP/s dense BF16), with stated
efficiency factors and per-pass overhead: assumptions, not measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a transformer (defaults: Qwen2.5-Coder-1.5B-Instruct)."""

    name: str = "qwen2.5-coder-1.5b-instruct"
    params_total: int = 1_543_714_304  # tied embeddings: the GGUF's tensors less its output.weight copy
    embedding_params: int = 233_373_696  # vocab 151,936 x hidden 1,536
    tied_embeddings: bool = True
    layers: int = 28
    heads: int = 12
    kv_heads: int = 2
    head_dim: int = 128  # hidden 1,536 / 12 heads
    bytes_per_weight: float = 2.0  # bf16
    bytes_per_kv: float = 2.0  # bf16 KV cache

    @property
    def params_read(self) -> int:
        """Parameters a forward pass reads in full: all but the input embedding table (see the docstring)."""
        untied_input = 0 if self.tied_embeddings else self.embedding_params
        return self.params_total - untied_input

    @property
    def weight_bytes(self) -> float:
        return self.params_read * self.bytes_per_weight

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_kv

    def flops_per_token(self, context: int) -> float:
        return 2 * self.params_read + 4 * self.layers * self.heads * self.head_dim * context


@dataclass(frozen=True)
class Device:
    """Public figures of the GPU and the fractions of them a serving stack reaches (assumptions)."""

    name: str = "NVIDIA H200 (SXM, 141 GB HBM3e)"
    memory_bandwidth: float = 4.8e12  # bytes/s, HBM3e
    bf16_flops: float = 989e12  # dense BF16 tensor-core FLOP/s (1,979 is with 2:4 sparsity)
    bandwidth_efficiency: float = 0.55  # of peak, in decode (assumed: 50-60 % is typical)
    flops_efficiency: float = 0.40  # of peak, in prefill and large check points (assumed)
    overhead_s: float = 1.5e-3  # per forward pass: launches, host-side top-k and sampling, the request


def forward_s(m: ModelShape, d: Device, sessions: int, tokens: int, context: int) -> float:
    """Seconds of one forward pass: `sessions` items, each `tokens` new tokens on `context` cached ones."""
    memory = (m.weight_bytes + sessions * (context + tokens) * m.kv_bytes_per_token) / (
        d.bandwidth_efficiency * d.memory_bandwidth
    )
    compute = (
        sessions * tokens * m.flops_per_token(context + tokens / 2) / (d.flops_efficiency * d.bf16_flops)
    )
    return d.overhead_s + max(memory, compute)


def crossover_tokens(m: ModelShape, d: Device, context: int) -> float:
    """New tokens per pass (all sessions together) above which a pass is compute-bound."""
    memory = m.weight_bytes / (d.bandwidth_efficiency * d.memory_bandwidth)
    return memory / (m.flops_per_token(context) / (d.flops_efficiency * d.bf16_flops))


def profile(m: ModelShape, d: Device, *, context: int, prompts: list[int], tokens: list[int],
            sessions: list[int]) -> dict:  # fmt: skip
    """The profile in bench_cloud.py --profile's JSON shape, with the derivation beside it."""
    decode = {s: forward_s(m, d, s, 1, context) for s in sessions}
    checks = [
        {"sessions": s, "tokens": n, "seconds": (t := forward_s(m, d, s, n, context)), "forward_s": t}
        for s in sessions
        for n in tokens
    ]
    return {
        "model": m.name,
        "backend": "estimated (roofline)",
        "device": d.name,
        "dtype": "bf16",
        "threads": None,
        "estimated": True,
        "settings": {"context_tokens": context, "top_k": 20},
        "profile": {
            "estimated": True,
            "rtt_s": 0.0,  # no loopback in an estimate: nothing to subtract
            # A prefill of p tokens: one pass, its attention over p/2 cached tokens on average.
            "open": [{"prompt_tokens": p, "seconds": forward_s(m, d, 1, p, 0)} for p in prompts],
            "check": checks,
            # A handoff's tokens are decode steps; its first feeds the session's last token first.
            "decode": [{"sessions": s, "seconds_per_token": decode[s], "first_token_s": decode[s]} for s in sessions],
        },
        "derivation": derivation(m, d, context, sessions),
    }  # fmt: skip


def derivation(m: ModelShape, d: Device, context: int, sessions: list[int]) -> dict:
    """Inputs, formulas and the numbers they give, for the file and the docs."""
    bw = d.bandwidth_efficiency * d.memory_bandwidth
    fl = d.flops_efficiency * d.bf16_flops
    per_token = {
        f"{s}_sessions": {
            "decode_gpu_s_per_token": forward_s(m, d, s, 1, context) / s,
            "check8_gpu_s_per_token": forward_s(m, d, s, 8, context) / (8 * s),
            "check1_gpu_s": forward_s(m, d, s, 1, context) / s,
        }
        for s in sessions
    }
    return {
        "note": "ESTIMATED from public hardware figures and the model's shape; not measured on a GPU.",
        "model": asdict(m) | {"params_read": m.params_read},
        "device": asdict(d),
        "context_tokens": context,
        "formulas": {
            "weight_bytes": "W = params_read * bytes_per_weight",
            "kv_bytes_per_token": "kv = 2 * layers * kv_heads * head_dim * bytes_per_kv",
            "flops_per_new_token": "F(c) = 2 * params_read + 4 * layers * heads * head_dim * c",
            "forward_s": "T(S, n, c) = overhead_s + max((W + S * (c + n) * kv) / (bandwidth_efficiency * "
            "memory_bandwidth), S * n * F(c + n / 2) / (flops_efficiency * bf16_flops))",
            "gpu_s_per_session": "T / S",
            "open": "T(1, prompt_tokens, 0)",
            "check": "T(S, n, context_tokens)",
            "decode": "T(S, 1, context_tokens) per token, first token the same",
        },
        "numbers": {
            "weight_bytes": m.weight_bytes,
            "kv_bytes_per_token": m.kv_bytes_per_token,
            "flops_per_new_token": m.flops_per_token(context),
            "effective_bandwidth_bytes_per_s": bw,
            "effective_flops": fl,
            "weights_read_s": m.weight_bytes / bw,
            "roofline_crossover_tokens_per_pass": crossover_tokens(m, d, context),
            "gpu_s_per_token": per_token,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the profile JSON to write")
    parser.add_argument("--context", type=int, default=256, help="cached tokens per session at a check point")
    parser.add_argument(
        "--overhead-ms", type=float, default=Device.overhead_s * 1000, help="per forward pass"
    )
    parser.add_argument("--bandwidth-efficiency", type=float, default=Device.bandwidth_efficiency)
    parser.add_argument("--flops-efficiency", type=float, default=Device.flops_efficiency)
    args = parser.parse_args(argv)
    m = ModelShape()
    d = Device(
        bandwidth_efficiency=args.bandwidth_efficiency,
        flops_efficiency=args.flops_efficiency,
        overhead_s=args.overhead_ms / 1000,
    )
    data = profile(m, d, context=args.context, prompts=[16, 32, 64, 128, 256, 512, 1024, 2048],
                   tokens=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512], sessions=[1, 4, 16, 64])  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    n = data["derivation"]["numbers"]
    print(f"ESTIMATED profile of {m.name} on {d.name} -> {args.out}")
    print(f"  weights read per pass {n['weight_bytes'] / 1e9:.3f} GB in {n['weights_read_s'] * 1e3:.3f} ms; "
          f"KV {n['kv_bytes_per_token']:.0f} B/token; {n['flops_per_new_token'] / 1e9:.3f} GFLOP/token; "
          f"compute-bound above {n['roofline_crossover_tokens_per_pass']:.0f} tokens per pass")  # fmt: skip
    for key, v in n["gpu_s_per_token"].items():
        print(f"  {key.replace('_', ' ')}: decode {v['decode_gpu_s_per_token'] * 1e3:.3f} ms/token "
              f"({v['decode_gpu_s_per_token'] * 1e3:.2f} GPU-s per 1,000 tokens), check of 8: "
              f"{v['check8_gpu_s_per_token'] * 1e3:.3f} ms/token, check of 1: {v['check1_gpu_s'] * 1e3:.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
