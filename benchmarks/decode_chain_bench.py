"""Batch-1 decode stand-in for Llama-3.1-8B: cuBLAS vs Triton skinny GEMMs, with and without
programmatic dependent launch (PDL), every timing inside a CUDA graph.

The chain is one decode step without attention over a KV cache: 32 layers of
    add+RMSNorm → q|k|v 6144×4096 → attention stand-in (reads q|k|v, writes 4096)
    → o 4096×4096 → add+RMSNorm → gate|up 28672×4096 → SiLU·mul → down 4096×14336
then add+RMSNorm → lm_head 128256×4096. Distinct random weights per layer (15.0 GB), so the
step streams every weight once from HBM, as a real decode step does.

Sections (each failure is caught, recorded and the rest still runs; JSON is rewritten after
every section, so a run cut short keeps what it measured):
    copy      1 GiB device-to-device copy, read + write bytes: the bandwidth ceiling
    isolated  per shape, M = 1 and 8: cuBLAS and the Triton kernel over a sweep of configs,
              each timed as a graph of back-to-back launches rotating over enough weight
              copies (≥ 200 MB) that L2 never holds the next one; PDL off and on; relative
              error of every config against cuBLAS
    chain     variants of the whole step (see VARIANTS); µs per step, tokens/s, GB/s, % of
              copy bandwidth, relative error of the logits against variants a and a2

Usage (GPU):  python3 benchmarks/decode_chain_bench.py --out $OUT
Dry run (CPU, Triton interpreter, tiny shapes, eager, PDL off — shakes out Python errors):
              python3 benchmarks/decode_chain_bench.py --dry-run --out /tmp/bench
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: Triton interpreter, tiny shapes, no graphs, PDL off")
    parser.add_argument("--replays", type=int, default=30, help="timed graph replays (median)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--sections", nargs="+", default=["copy", "isolated", "chain"],
                        choices=["copy", "isolated", "chain"])
    parser.add_argument("--tuning-budget", type=float, default=80.0,
                        help="seconds into the isolated section after which the remaining "
                             "tuning configs are skipped")
    # Internal: the parent runs each risky section in a child process, so a sticky CUDA error
    # (or a hang) in one loses only that section.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--copy-gbps", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--isolated-json", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


ARGS = parse_args()
if ARGS.dry_run:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402


def _import_gemv():
    """kiln.kernels.gemv without running kiln/__init__.py, which imports pydantic and the
    engine: the GPU machine has torch and triton, and nothing else is needed here."""
    root = Path(__file__).resolve().parents[1] / "kiln"
    for name, path in (("kiln", root), ("kiln.kernels", root / "kernels")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    return importlib.import_module("kiln.kernels.gemv")


gemv = _import_gemv()
GemvConfig = gemv.GemvConfig

DTYPE = torch.bfloat16
EPS = 1e-5
L2_ROTATION_BYTES = 200e6  # H100 L2 is 50 MB: rotate over 4× that
START = time.perf_counter()


@dataclass(frozen=True)
class Geometry:
    hidden: int
    qkv: int  # q + k + v output features
    kv: int  # k (= v) output features
    intermediate: int
    vocab: int
    layers: int

    def linear_shapes(self) -> dict[str, tuple[int, int]]:  # kind → (N, K)
        return {"qkv": (self.qkv, self.hidden), "o": (self.hidden, self.hidden),
                "gate_up": (2 * self.intermediate, self.hidden),
                "down": (self.hidden, self.intermediate), "lm_head": (self.vocab, self.hidden)}

    def weight_bytes(self) -> int:
        per_layer = sum(n * k for kind, (n, k) in self.linear_shapes().items() if kind != "lm_head")
        per_layer += 2 * self.hidden  # the two norm weights
        return 2 * (self.layers * per_layer + self.vocab * self.hidden + self.hidden)


LLAMA_8B = Geometry(hidden=4096, qkv=6144, kv=1024, intermediate=14336, vocab=128256, layers=32)
TINY = Geometry(hidden=128, qkv=192, kv=32, intermediate=256, vocab=512, layers=2)


# --- Stand-in small kernels (Triton, PDL-aware) and their torch twins ---------------------
# Under PDL they trigger the next launch first, then wait: they are tiny (one CTA or a few),
# so letting the next GEMV's programs start streaming weights right away costs nothing, and
# that GEMV still waits for this kernel to finish before reading what it writes.

@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, gamma_ptr, out_ptr, res_out_ptr, H, eps,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # not produced
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + res).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * H + cols, summed, mask=mask)
    h = summed.to(tl.float32)
    normed = (h * tl.rsqrt(tl.sum(h * h, 0) / H + eps)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * H + cols, (normed.to(tl.float32) * gamma).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _attention_stand_in_kernel(qkv_ptr, out_ptr, H, KV, QKV, BLOCK: tl.constexpr,
                               USE_PDL: tl.constexpr):
    # out = q + v·sigmoid(k), k and v repeated over the query heads: reads all of q|k|v.
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    base = qkv_ptr + row * QKV
    q = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(base + H + cols % KV, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(base + H + KV + cols % KV, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (q + v / (1.0 + tl.exp(-k))).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    gate = tl.load(gu_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * I + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x, res, gamma, pdl):
    m, h = x.shape
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(m,)](x, res, gamma, out, res_out, h, EPS, BLOCK=triton.next_power_of_2(h),
                               USE_PDL=pdl, num_warps=8, launch_pdl=pdl)
    return out, res_out


def attention_stand_in_triton(qkv, geometry, pdl):
    m = qkv.shape[0]
    out = torch.empty(m, geometry.hidden, dtype=qkv.dtype, device=qkv.device)
    grid = (m, triton.cdiv(geometry.hidden, 1024))
    _attention_stand_in_kernel[grid](qkv, out, geometry.hidden, geometry.kv, geometry.qkv,
                                     BLOCK=1024, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def silu_mul_triton(gu, pdl):
    m, two_i = gu.shape
    out = torch.empty(m, two_i // 2, dtype=gu.dtype, device=gu.device)
    grid = (m, triton.cdiv(two_i // 2, 1024))
    _silu_mul_kernel[grid](gu, out, two_i // 2, BLOCK=1024, USE_PDL=pdl, num_warps=4,
                           launch_pdl=pdl)
    return out


def add_rms_norm_torch(x, res, gamma, pdl=False):
    h = x + res
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return normed * gamma, h


def attention_stand_in_torch(qkv, geometry, pdl=False):
    q, k, v = qkv.split([geometry.hidden, geometry.kv, geometry.kv], dim=-1)
    return q + (v * torch.sigmoid(k)).repeat(1, geometry.hidden // geometry.kv)


def silu_mul_torch(gu, pdl=False):
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- Measurement --------------------------------------------------------------------------

def sync():
    if not ARGS.dry_run:
        torch.cuda.synchronize()


def measure(fn, replays: int) -> dict:
    """Median µs of `fn` captured in a CUDA graph (eager with perf_counter in a dry run).
    `fn` runs once eagerly first, which compiles its Triton kernels outside the capture."""
    out = fn()
    sync()
    if ARGS.dry_run:
        times = []
        for _ in range(max(2, replays // 10)):
            start = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - start) * 1e6)
        return {"median_us": statistics.median(times), "min_us": min(times), "out": out}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1e3 for start, end in events]
    del graph
    return {"median_us": statistics.median(times), "min_us": min(times), "out": out}


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.float(), reference.float()
    return float((out - reference).norm() / reference.norm().clamp_min(1e-30))


def error_record(exc: BaseException) -> dict:
    record = {"error": f"{type(exc).__name__}: {exc}"[:500],
              "traceback": traceback.format_exc(limit=6)[-3000:]}
    if not ARGS.dry_run:
        try:
            torch.cuda.synchronize()
        except Exception as sync_exc:  # a sticky CUDA error: nothing after this can run
            record["cuda_broken"] = f"{type(sync_exc).__name__}: {sync_exc}"[:300]
    return record


def over_budget() -> bool:
    return time.perf_counter() - START > ARGS.tuning_budget


_RESOURCES: dict = {}


def run_noting_resources(key, fn) -> dict:
    """Runs fn; if that compiled a new skinny-GEMM kernel, remembers its registers and spills
    under `key`. Returns what is known for `key` (GPU only; {} otherwise)."""
    try:
        cache = gemv._skinny_gemm_kernel.device_caches[torch.cuda.current_device()][0]
    except Exception:
        fn()
        return {}
    before = len(cache)
    fn()
    if len(cache) > before:
        kernel = list(cache.values())[-1]
        _RESOURCES[key] = {"regs": getattr(kernel, "n_regs", None),
                           "spills": getattr(kernel, "n_spills", None)}
    return _RESOURCES.get(key, {})


# --- Sections ------------------------------------------------------------------------------

def section_copy(device) -> dict:
    n = (1 << 30) // 2 if not ARGS.dry_run else 1 << 20
    src = torch.randn(n, device=device).to(DTYPE)
    dst = torch.empty_like(src)
    result = measure(lambda: dst.copy_(src), ARGS.replays)
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    return {"bytes": nbytes, "median_us": result["median_us"],
            "GBps": nbytes / result["median_us"] / 1e3}


def tuning_configs(m: int, gate_up: bool) -> list[GemvConfig]:
    C = GemvConfig
    if ARGS.dry_run:
        return [C(16, 64), C(8, 128, l2_prefetch_tiles=2)]
    if m == 1 and not gate_up:
        # Registers (sm_90 build): 60 for 16 weight elements per thread and tile, 107 for 32,
        # 175 for 64 — and so programs per SM — vary along this list.
        plain = [C(16, 256, 4), C(16, 512, 8), C(8, 512, 4), C(32, 256, 8), C(8, 1024, 8),
                 C(4, 512, 4), C(32, 128, 4), C(16, 512, 4), C(16, 1024, 8)]
        l2 = [C(16, 256, 4, l2_prefetch_tiles=2), C(16, 256, 4, l2_prefetch_tiles=4),
              C(8, 512, 4, l2_prefetch_tiles=2), C(32, 128, 4, l2_prefetch_tiles=4),
              C(16, 512, 8, l2_prefetch_tiles=2), C(4, 512, 4, l2_prefetch_tiles=3)]
    elif m == 1:  # block_n counts rows of each half
        plain = [C(8, 256, 4), C(8, 512, 8), C(4, 512, 4), C(16, 256, 8), C(4, 1024, 8),
                 C(16, 128, 4)]
        l2 = [C(8, 256, 4, l2_prefetch_tiles=2), C(8, 256, 4, l2_prefetch_tiles=4),
              C(4, 512, 4, l2_prefetch_tiles=2), C(16, 128, 4, l2_prefetch_tiles=4)]
    elif not gate_up:
        plain = [C(16, 256, 4), C(16, 512, 4), C(16, 512, 8), C(32, 256, 4), C(16, 128, 4),
                 C(32, 512, 8), C(16, 256, 4, num_stages=2), C(16, 256, 4, num_stages=3)]
        l2 = [C(16, 256, 4, l2_prefetch_tiles=2), C(32, 256, 4, l2_prefetch_tiles=3)]
    else:
        plain = [C(16, 128, 4), C(16, 256, 4), C(16, 256, 8), C(32, 256, 8), C(16, 512, 8)]
        l2 = [C(16, 256, 4, l2_prefetch_tiles=2), C(16, 128, 4, l2_prefetch_tiles=4)]
    return plain + l2


def section_isolated(geometry: Geometry, device, copy_gbps: float | None, results: dict) -> None:
    """Fills results["isolated"] (a list of per-(shape, M) records) as it goes."""
    shapes = dict(geometry.linear_shapes())
    records = results.setdefault("isolated", [])
    # M = 1 first (the decode case the chain uses), the fused gate/up/silu with it.
    cases = [(kind, n, k, m) for m in (1, 8)
             for kind, (n, k) in [*shapes.items(), ("gate_up_silu", shapes["gate_up"])]]
    for kind, n, k, m in cases:
        record = {"kind": kind, "N": n, "K": k, "M": m, "configs": []}
        records.append(record)
        print(f"isolated {kind} {n}x{k} M={m} ({time.perf_counter() - START:.0f} s)", flush=True)
        try:
            _isolated_case(record, kind, n, k, m, device, copy_gbps)
        except Exception as exc:
            record.update(error_record(exc))
            if "cuda_broken" in record:
                return
        finally:
            torch.cuda.empty_cache() if not ARGS.dry_run else None
        write_json(results)


def _isolated_case(record, kind, n, k, m, device, copy_gbps):
    gate_up = kind == "gate_up_silu"
    weight_bytes = n * k * 2
    copies = max(2, math.ceil(L2_ROTATION_BYTES / weight_bytes)) if not ARGS.dry_run else 2
    weights = [(torch.randn(n, k, device=device, dtype=DTYPE) * k**-0.5) for _ in range(copies)]
    x = torch.randn(m, k, device=device).to(DTYPE)
    launches = max(copies, 8) if not ARGS.dry_run else copies  # per graph replay

    def per_launch(op) -> dict:
        result = measure(lambda: [op(weights[i % copies]) for i in range(launches)], ARGS.replays)
        us = result["median_us"] / launches
        gbps = weight_bytes / us / 1e3
        entry = {"us": us, "GBps": gbps}
        if copy_gbps:
            entry["pct_copy"] = 100 * gbps / copy_gbps
        return entry, result["out"][0]

    if gate_up:
        cublas_op = lambda w: silu_mul_torch(F.linear(x, w))  # noqa: E731
    else:
        cublas_op = lambda w: F.linear(x, w)  # noqa: E731
    record["cublas"], reference = per_launch(cublas_op)
    record["weight_copies"], record["launches_per_graph"] = copies, launches

    triton_fn = gemv.skinny_gate_up_silu if gate_up else gemv.skinny_linear
    configs = [None] + tuning_configs(m, gate_up)
    for config in configs:
        if config is not None and over_budget():
            record["configs"].append({"config": asdict(config), "skipped": "time budget"})
            continue
        entry = {"config": asdict(config) if config else "default"}
        record["configs"].append(entry)
        for pdl in (False, True):
            if pdl and ARGS.dry_run:
                continue
            try:
                op = lambda w: triton_fn(x, w, pdl=pdl, config=config)  # noqa: E731
                resources = run_noting_resources((gate_up, m == 1, config, pdl),
                                                 lambda: op(weights[0]))
                timing, out = per_launch(op)
                timing["rel_err_vs_cublas"] = relative_error(out, reference)
                entry["pdl" if pdl else "no_pdl"] = {**timing, **resources}
            except Exception as exc:
                entry["pdl" if pdl else "no_pdl"] = error_record(exc)
                if "cuda_broken" in entry["pdl" if pdl else "no_pdl"]:
                    raise RuntimeError("CUDA context broken") from exc
    for pdl_key in ("no_pdl", "pdl"):
        valid = [e for e in record["configs"]
                 if "us" in e.get(pdl_key, {}) and e[pdl_key]["rel_err_vs_cublas"] < 2e-2]
        if valid:
            best = min(valid, key=lambda e: e[pdl_key]["us"])
            record[f"best_{pdl_key}"] = {"config": best["config"], **best[pdl_key]}


def best_config(results: dict, kind: str, m: int, pdl_key: str) -> GemvConfig | None:
    for record in results.get("isolated", []):
        if record["kind"] == kind and record["M"] == m and f"best_{pdl_key}" in record:
            config = record[f"best_{pdl_key}"]["config"]
            return None if config == "default" else GemvConfig(**config)
    return None


@dataclass
class Layer:
    norm1: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    norm2: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def build_weights(geometry: Geometry, device):
    def linear(n, k):
        return torch.randn(n, k, device=device, dtype=DTYPE).mul_(k**-0.5)

    def norm():
        return (1 + 0.1 * torch.randn(geometry.hidden, device=device)).to(DTYPE)

    shapes = geometry.linear_shapes()
    layers = [Layer(norm(), linear(*shapes["qkv"]), linear(*shapes["o"]), norm(),
                    linear(*shapes["gate_up"]), linear(*shapes["down"]))
              for _ in range(geometry.layers)]
    return layers, norm(), linear(*shapes["lm_head"])


VARIANTS = {
    # name: (linear backend, small kernels, pdl, fused gate/up/silu, config source)
    "a_cublas_torch": ("cublas", "torch", False, False, None),
    "a2_cublas_triton_small": ("cublas", "triton", False, False, None),
    "b_triton": ("triton", "triton", False, False, "default"),
    "c_triton_pdl": ("triton", "triton", True, False, "default"),
    "d_triton_pdl_fused": ("triton", "triton", True, True, "default"),
    "b_triton_tuned": ("triton", "triton", False, False, "no_pdl"),
    "c_triton_pdl_tuned": ("triton", "triton", True, False, "pdl"),
    "d_triton_pdl_fused_tuned": ("triton", "triton", True, True, "pdl"),
}


REFERENCES = {"a": "a_cublas_torch", "a2": "a2_cublas_triton_small"}


def make_step(name, geometry, layers, final_norm, lm_head, x_in, res0, results):
    backend, small, pdl, fused, config_source = VARIANTS[name]
    pdl = pdl and not ARGS.dry_run
    m = x_in.shape[0]
    configs = {}
    for kind in ("qkv", "o", "gate_up", "down", "lm_head", "gate_up_silu"):
        configs[kind] = (None if config_source in (None, "default")
                         else best_config(results, kind, m, config_source))

    def linear(x, w, kind):
        if backend == "cublas":
            return F.linear(x, w)
        return gemv.skinny_linear(x, w, pdl=pdl, config=configs[kind])

    norm = add_rms_norm_triton if small == "triton" else add_rms_norm_torch
    attention = attention_stand_in_triton if small == "triton" else attention_stand_in_torch
    silu_mul = silu_mul_triton if small == "triton" else silu_mul_torch

    def step():
        x, res = x_in, res0
        for layer in layers:
            h, res = norm(x, res, layer.norm1, pdl)
            a = attention(linear(h, layer.qkv, "qkv"), geometry, pdl)
            h, res = norm(linear(a, layer.o, "o"), res, layer.norm2, pdl)
            if fused:
                act = gemv.skinny_gate_up_silu(h, layer.gate_up, pdl=pdl,
                                               config=configs["gate_up_silu"])
            else:
                act = silu_mul(linear(h, layer.gate_up, "gate_up"), pdl)
            x = linear(act, layer.down, "down")
        h, _ = norm(x, res, final_norm, pdl)
        return linear(h, lm_head, "lm_head")

    used = ({k: asdict(v) if v else "default" for k, v in configs.items()}
            if backend == "triton" else {})
    return step, used


def section_chain(geometry: Geometry, device, copy_gbps: float | None, results: dict) -> None:
    chain = results.setdefault("chain", {})
    start = time.perf_counter()
    layers, final_norm, lm_head = build_weights(geometry, device)
    sync()
    chain["weight_bytes"] = geometry.weight_bytes()
    chain["weights_built_s"] = time.perf_counter() - start
    x_in = torch.randn(1, geometry.hidden, device=device).to(DTYPE)
    res0 = torch.zeros_like(x_in)
    outputs = {}
    for name in VARIANTS:
        record = chain.setdefault(name, {})
        if name.endswith("_tuned") and not results.get("isolated"):
            record["skipped"] = "no isolated tuning results"
            continue
        print(f"chain {name} ({time.perf_counter() - START:.0f} s)", flush=True)
        try:
            step, used = make_step(name, geometry, layers, final_norm, lm_head, x_in, res0,
                                   results)
            record["configs"] = used
            result = measure(step, ARGS.replays)
            us = result["median_us"]
            outputs[name] = result["out"]
            gbps = geometry.weight_bytes() / us / 1e3
            record.update({"us_per_step": us, "min_us": result["min_us"],
                           "tokens_per_s": 1e6 / us, "GBps": gbps})
            if copy_gbps:
                record["pct_copy"] = 100 * gbps / copy_gbps
            for short, reference in REFERENCES.items():
                if reference in outputs and reference != name:
                    record[f"rel_err_vs_{short}"] = relative_error(outputs[name],
                                                                   outputs[reference])
            if name == "c_triton_pdl" and "b_triton" in outputs:
                # Same kernels and configs as b, only launched with PDL: any race under PDL
                # (a kernel reading its input before the previous one finished) changes bits.
                record["bitwise_equal_to_b"] = bool(torch.equal(outputs[name],
                                                                outputs["b_triton"]))
            if not torch.isfinite(result["out"].float()).all():
                record["warning"] = "non-finite logits"
        except Exception as exc:
            record.update(error_record(exc))
            if "cuda_broken" in record:
                break
        write_json(results)


# --- Output -----------------------------------------------------------------------------------

def json_path(part: str | None = None) -> Path:
    name = "decode_chain_bench" + ("_dry_run" if ARGS.dry_run else "")
    return ARGS.out / (f"{name}.{part}.json" if part else f"{name}.json")


def write_json(results: dict) -> None:
    ARGS.out.mkdir(parents=True, exist_ok=True)
    path = json_path(ARGS.sections[0] if ARGS.child else None)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1, default=str))
    temporary.replace(path)  # atomic: a child killed mid-write leaves the previous file


def fmt(value, spec=".1f"):
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def print_table(results: dict) -> None:
    print(f"\n== {results['env'].get('device')}  (torch {results['env']['torch']}, "
          f"triton {results['env']['triton']})")
    copy = results.get("copy", {})
    if "GBps" in copy:
        print(f"device copy 1 GiB: {copy['GBps']:.0f} GB/s (read+write)")
    elif copy:
        print(f"device copy: {copy.get('error')}")
    chain = results.get("chain", {})
    if chain:
        print(f"\nchain: {chain.get('weight_bytes', 0) / 1e9:.2f} GB of weights per step")
        print(f"{'variant':28} {'us/step':>9} {'tok/s':>7} {'GB/s':>7} {'%copy':>6} "
              f"{'err vs a':>9} {'err vs a2':>9}  notes")
        for name in VARIANTS:
            r = chain.get(name, {})
            if "us_per_step" in r:
                print(f"{name:28} {r['us_per_step']:9.0f} {r['tokens_per_s']:7.1f} "
                      f"{r['GBps']:7.0f} {fmt(r.get('pct_copy')):>6} "
                      f"{fmt(r.get('rel_err_vs_a'), '.1e'):>9} "
                      f"{fmt(r.get('rel_err_vs_a2'), '.1e'):>9}  "
                      + ("" if "bitwise_equal_to_b" not in r else
                         "bitwise = b" if r["bitwise_equal_to_b"] else "DIFFERS FROM b (race?)")
                      + (f" {r['warning']}" if "warning" in r else ""))
            else:
                print(f"{name:28} {r.get('skipped') or r.get('error', 'not run')}"[:160])
    isolated = results.get("isolated", [])
    if isolated:
        print("\nisolated, per launch (graph of back-to-back launches, L2-rotated weights): "
              "us (GB/s); err = relative error of the best PDL config against cuBLAS")
        print(f"{'kind':13} {'N×K':>13} {'M':>2} {'cuBLAS':>14} {'triton dflt':>14} "
              f"{'dflt+PDL':>14} {'best noPDL':>14} {'best PDL':>14} {'err':>7}  best PDL config")
        for r in isolated:
            def cell(entry):
                return f"{entry['us']:.1f} ({entry['GBps']:.0f})" if entry and "us" in entry \
                    else "err" if entry else "-"
            default = next((c for c in r.get("configs", []) if c["config"] == "default"), {})
            best = r.get("best_pdl", {})
            config = best.get("config", "-")
            if isinstance(config, dict):
                config = "n{block_n} k{block_k} w{num_warps} s{num_stages} l2:{l2_prefetch_tiles}" \
                    .format(**config)
            print(f"{r['kind']:13} {r['N']:>6}×{r['K']:<6} {r['M']:>2} "
                  f"{cell(r.get('cublas')):>14} {cell(default.get('no_pdl')):>14} "
                  f"{cell(default.get('pdl')):>14} {cell(r.get('best_no_pdl')):>14} "
                  f"{cell(best):>14} "
                  f"{fmt(best.get('rel_err_vs_cublas'), '.1e'):>7}  {config}"
                  + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))
        errors = sorted({e.get(key, {}).get("error", "")[:120] for r in isolated
                         for e in r.get("configs", []) for key in ("no_pdl", "pdl")} - {""})
        for error in errors[:5]:
            print(f"  config error: {error}")
    for section, status in results.get("child_status", {}).items():
        print(f"{section}: {status} (partial results kept)")
    print(f"\ntotal {time.perf_counter() - START:.0f} s; JSON in {json_path()}")


def run_child(section: str, copy_gbps: float | None, timeout: float) -> dict:
    """Runs one section in a child process; returns what it wrote, plus how it ended."""
    command = [sys.executable, __file__, "--child", "--out", str(ARGS.out), "--sections", section,
               "--replays", str(ARGS.replays), "--tuning-budget", str(ARGS.tuning_budget),
               "--isolated-json", str(json_path("isolated"))]
    command += ["--dry-run"] if ARGS.dry_run else []
    command += ["--copy-gbps", str(copy_gbps)] if copy_gbps else []
    command += ["--layers", str(ARGS.layers)] if ARGS.layers is not None else []
    json_path(section).unlink(missing_ok=True)
    try:
        returncode = subprocess.run(command, timeout=timeout).returncode
        status = "ok" if returncode == 0 else f"child exited with {returncode}"
    except subprocess.TimeoutExpired:
        status = f"child killed after {timeout:.0f} s"
    try:
        part = json.loads(json_path(section).read_text())
    except (OSError, ValueError):
        part = {}
    if status != "ok":
        part.setdefault("child_status", {})[section] = status
    return part


def run_sections(geometry: Geometry, device, results: dict) -> None:
    """The child's work: the one section it was given."""
    if "isolated" in ARGS.sections:
        section_isolated(geometry, device, ARGS.copy_gbps, results)
    if "chain" in ARGS.sections:
        if ARGS.isolated_json and ARGS.isolated_json.exists():
            results["isolated"] = json.loads(ARGS.isolated_json.read_text()).get("isolated", [])
        try:
            section_chain(geometry, device, ARGS.copy_gbps, results)
        except Exception as exc:
            results.setdefault("chain", {}).update(error_record(exc))
        results.pop("isolated", None)  # the isolated part's own file has it
    write_json(results)


def main() -> None:
    device = "cpu" if ARGS.dry_run else "cuda"
    geometry = TINY if ARGS.dry_run else LLAMA_8B
    if ARGS.layers is not None:
        geometry = Geometry(**{**asdict(geometry), "layers": ARGS.layers})
    torch.manual_seed(0)
    if ARGS.child:
        run_sections(geometry, device, {})
        return
    env = {"torch": torch.__version__, "triton": triton.__version__, "dry_run": ARGS.dry_run,
           "geometry": asdict(geometry)}
    if not ARGS.dry_run:
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = torch.cuda.get_device_capability()
    results = {"env": env}
    write_json(results)
    copy_gbps = None
    if "copy" in ARGS.sections:
        try:
            results["copy"] = section_copy(device)
            copy_gbps = results["copy"]["GBps"]
            if not ARGS.dry_run:
                torch.cuda.empty_cache()  # the children need the memory
        except Exception as exc:
            results["copy"] = error_record(exc)
        write_json(results)
    # Wall-clock plan for the whole run (< 3 minutes): tuning stops itself at --tuning-budget;
    # the hard limits only catch hangs.
    for section, limit in (("isolated", ARGS.tuning_budget + 30), ("chain", 55)):
        if section in ARGS.sections:
            part = run_child(section, copy_gbps, limit)
            for key, value in part.items():
                if key == "child_status":
                    results.setdefault("child_status", {}).update(value)
                else:
                    results[key] = value
            write_json(results)
    print_table(results)


if __name__ == "__main__":
    main()
