"""FP8 decode linears (M = 1-16) at Llama-3.1-8B shapes on one GPU: the swap-AB skinny FP8 GEMM
(kiln/kernels/skinny_fp8.py) over a grid of configs, against the bf16 GEMV, cuBLAS bf16, the
current fp8 `quant_linear` and `torch._scaled_mm`.

Sections:
    copy     2 GiB device-to-device copy, read + write bytes over the time: the ceiling
    compile  every grid config once on a small problem (compile errors recorded, not fatal)
    shapes   q|k|v, o, gate|up, down, lm_head × M in (1, 16) over the whole grid, then
             M in (2, 4, 8) over the best few (and their 8-token, atomic and serial
             split-K and no-PDL variants). Every candidate is timed as CALLS back-to-back
             calls captured in one CUDA graph (median of REPLAYS replays, CUDA events), each
             call on fresh inputs and the next of ≥ 4 weight copies (≥ 200 MB, so L2 holds
             none of them); quantising x is part of every fp8 candidate. At M = 1 and 16
             each candidate's output is checked against fp8_linear_reference (max abs and
             relative error; the bf16 ones multiply the dequantised weight by unquantised x,
             so theirs includes the activation quantisation error).

Output: a table (µs, weight GB/s, % of copy bandwidth) and everything as JSON in
--out/skinny-sweep-<timestamp>-<device>.json. --budget (s) caps the run: configs left when it
runs out are recorded as skipped.

Usage (GPU, repo root):  PYTHONPATH=$PWD python3 -P benchmarks/skinny_sweep.py --out $OUT
Dry run (CPU, Triton interpreter, tiny shapes, 2 configs, eager timing):
    python -P benchmarks/skinny_sweep.py --device cpu --dry-run --out /tmp/skinny
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

START = time.perf_counter()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: Triton interpreter (implies --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes and two configs: exercises every code path")
    parser.add_argument("--budget", type=float, default=135.0,
                        help="seconds; grid configs left after it are skipped")
    parser.add_argument("--calls", type=int, default=50, help="calls per CUDA graph")
    parser.add_argument("--replays", type=int, default=5, help="timed replays (median)")
    args = parser.parse_args()
    args.dry_run = args.dry_run or args.device == "cpu"
    return args


ARGS = parse_args()
if ARGS.device == "cpu":  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

try:
    import kiln  # noqa: F401
except ImportError:  # run from a checkout that is not installed: the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.kernels import gemv, quant_linear  # noqa: E402
from kiln.kernels.quant_linear import FP8_DTYPE, KIND_FP8, fp8_linear_reference  # noqa: E402
from kiln.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}  # (N, K)
DRY_SHAPES = {"qkv": (192, 256), "o": (128, 256), "gate_up": (256, 256), "down": (128, 512),
              "lm_head": (320, 256)}
FULL_GRID_ROWS = (1, 16)
FEW_ROWS = (2,) if ARGS.dry_run else (2, 4, 8)  # M = 2 exercises the path in a dry run
LAYERS = 32  # Llama-3.1-8B, for the per-token estimate
L2_ROTATION_BYTES = 200e6  # the H200's L2 is 50 MB: rotate over 4× that
NUM_SMS = 132
SHARED_MEMORY = 227 * 1024  # per block on sm_90
TOP = 3  # configs carried from M = 1 and 16 to M = 2, 4, 8


# --- Configs ---------------------------------------------------------------------------------

def config_grid() -> list[SkinnyFp8Config]:
    """Likely-best first (4 stages, 4 warps), so a budget cut drops the long shots."""
    if ARGS.dry_run:
        return [SkinnyFp8Config(64, 128, 16, 1, 4, 2), SkinnyFp8Config(64, 128, 16, 2, 4, 2)]
    grid = []
    for stages, warps, block_n, block_k in itertools.product((4, 3, 5), (4, 8), (128, 64),
                                                             (256, 128)):
        # A stage holds a weight tile and an x tile; the epilogue's layout change needs the
        # fp32 accumulator once more. All of these fit (5 × 144 × 256 B = 184 KB at most).
        if stages * (block_n + 16) * block_k + block_n * 16 * 4 > SHARED_MEMORY:
            continue
        for split_k in (1, 2, 4, 8):
            grid.append(SkinnyFp8Config(block_n, block_k, 16, split_k, warps, stages))
    return grid


def useful(config: SkinnyFp8Config, n: int, k: int) -> bool:
    """Drops configs the launcher would clip into another (more splits than K tiles) and
    splits past 8 programs per SM, where split-K only adds partial-sum traffic."""
    tiles = k // min(config.block_k, k & -k)
    programs = math.ceil(n / config.block_n) * config.split_k
    return config.split_k <= tiles and (config.split_k == 1 or programs <= 8 * NUM_SMS)


def compile_key(config: SkinnyFp8Config) -> str:
    """What the kernel's compiled variants depend on: split_k's value is a runtime argument,
    only whether it is 1 is not."""
    return label(replace(config, split_k=min(config.split_k, 2)))


def label(config: SkinnyFp8Config) -> str:
    text = (f"n{config.block_n} k{config.block_k} t{config.tokens} s{config.split_k} "
            f"w{config.num_warps} st{config.num_stages}")
    if config.split_k > 1 and config.split_k_mode != "reduce":
        text += f" {config.split_k_mode}"
    return text + ("" if config.pdl else " nopdl")


# --- Measurement -----------------------------------------------------------------------------

def synchronize() -> None:
    if ARGS.device == "cuda":
        torch.cuda.synchronize()


def time_us(call) -> tuple[float, torch.Tensor]:
    """µs per call of call(i), i = 0, 1, ...: CALLS calls in one CUDA graph, median of REPLAYS
    replays (eager with perf_counter on the CPU). Returns the time and call(0)'s output, run
    eagerly first (outside the capture: it compiles)."""
    first = call(0)
    synchronize()
    if ARGS.device == "cpu":
        times = []
        for i in range(2):
            begin = time.perf_counter()
            call(i + 1)
            times.append((time.perf_counter() - begin) * 1e6)
        return statistics.median(times), first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(ARGS.calls):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(ARGS.replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / ARGS.calls)
    del graph
    return statistics.median(times), first


def error_record(error: BaseException) -> dict:
    record = {"error": f"{type(error).__name__}: {error}"[:400],
              "traceback": traceback.format_exc(limit=4)[-1500:]}
    if ARGS.device == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception as sticky:  # the context is broken: nothing after this can run
            record["cuda_broken"] = f"{type(sticky).__name__}: {sticky}"[:300]
    return record


def out_of_time(fraction: float = 1.0) -> bool:
    return time.perf_counter() - START > fraction * ARGS.budget


# Time slots: what is left of the budget is shared among the (shape, M) runs still to come,
# weighted: a full grid (M = 1, 16) counts SLOT_WEIGHT[True], the best few SLOT_WEIGHT[False].
SLOT_WEIGHT = {True: 3.0, False: 1.0}


def slot_deadline(weight: float, weight_left: float) -> float:
    left = max(0.0, ARGS.budget - (time.perf_counter() - START))
    return time.perf_counter() + left * weight / weight_left


def copy_bandwidth() -> dict:
    nbytes = (2 << 30) if not ARGS.dry_run else (1 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ARGS.device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(ARGS.replays + 1):
        if ARGS.device == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            times.append((time.perf_counter() - begin) * 1e6)
    us = statistics.median(times[1:])
    del src, dst
    return {"bytes": nbytes, "us": us, "gb_s": 2 * nbytes / us / 1e3}  # read + write


# --- Candidates ------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, round to nearest: kiln/quant/quantize.py's fp8 scheme."""
    scale = (w.abs().amax(dim=1) / 448.0).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-448, 448).to(FP8_DTYPE), scale


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales, x quantised per token and padded to 16 rows."""
    m = x.shape[0]
    x_q, x_scale = quant_linear.quantize_fp8_per_token(F.pad(x, (0, 0, 0, 16 - m)))
    y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1),
                         out_dtype=torch.bfloat16)
    return y[:m]


def baselines(m: int, n: int, k: int) -> dict:
    """name → fn(x, fp8 weight, scale, bf16 weight)."""
    gemv_config = gemv.decode_config(n, k) if m == 1 else None
    return {
        "bf16_gemv": lambda x, w, s, wb: gemv.skinny_linear(x, wb, None, pdl=True,
                                                            config=gemv_config),
        "bf16_cublas": lambda x, w, s, wb: F.linear(x, wb),
        "fp8_quant_linear": lambda x, w, s, wb: quant_linear.quant_linear(x, KIND_FP8, w, s),
        "fp8_scaled_mm": lambda x, w, s, wb: scaled_mm(x, w, s),
    }


class Shape:
    """One linear's weights (COPIES rotating copies, fp8 and bf16) and its measurements."""

    def __init__(self, name: str, n: int, k: int):
        self.name, self.n, self.k = name, n, k
        self.fp8_bytes = n * k + 4 * n  # weight + scales
        self.bf16_bytes = 2 * n * k
        self.copies = 2 if ARGS.dry_run else max(4, math.ceil(L2_ROTATION_BYTES / self.fp8_bytes))
        generator = torch.Generator(device=ARGS.device).manual_seed(0)
        self.fp8, self.bf16 = [], []
        for _ in range(self.copies):
            w = torch.randn(n, k, device=ARGS.device, generator=generator) * 0.02
            q, scale = quantize_weight(w)
            self.fp8.append((q, scale))
            self.bf16.append((q.float() * scale[:, None]).to(torch.bfloat16))  # same values
            del w
        self.record = {"shape": name, "n": n, "k": k, "fp8_weight_bytes": self.fp8_bytes,
                       "bf16_weight_bytes": self.bf16_bytes, "weight_copies": self.copies,
                       "rows": {}}

    def inputs(self, m: int) -> list[torch.Tensor]:
        generator = torch.Generator(device=ARGS.device).manual_seed(m)
        return [torch.randn(m, self.k, device=ARGS.device, generator=generator)
                .to(torch.bfloat16) for _ in range(4)]

    def measure(self, m: int, name: str, fn, xs, reference, weight_bytes: int,
                copy_gb_s: float) -> dict:
        def call(i):
            q, scale = self.fp8[i % self.copies]
            return fn(xs[i % len(xs)], q, scale, self.bf16[i % self.copies])

        row = {"name": name}
        try:
            us, first = time_us(call)
        except Exception as error:
            row.update(error_record(error))
            if "cuda_broken" in row:  # nothing more can run: end this shape, and the sweep
                raise
            return row
        row.update(us=round(us, 2), gb_s=round(weight_bytes / us / 1e3, 1),
                   pct_copy=round(100 * weight_bytes / us / 1e3 / copy_gb_s, 1))
        if reference is not None:
            difference = (first.float() - reference).abs().max().item()
            row.update(max_abs_error=difference,
                       max_rel_error=difference / max(reference.abs().max().item(), 1e-30))
        return row


def run_shape(shape: Shape, grid: list[SkinnyFp8Config], compiled: dict, copy_gb_s: float,
              weight_left: float) -> None:
    """Every M of one shape; `weight_left`: the slot weights of this and all later shapes."""
    results = {}
    for m in FULL_GRID_ROWS + FEW_ROWS:
        weight = SLOT_WEIGHT[m in FULL_GRID_ROWS]
        deadline = slot_deadline(weight, weight_left)
        weight_left -= weight

        def late(deadline=deadline):
            return time.perf_counter() > deadline

        xs = shape.inputs(m)
        reference = None
        if m in FULL_GRID_ROWS:
            q, scale = shape.fp8[0]
            reference = fp8_linear_reference(xs[0], q, scale).float()
        rows = []
        for name, fn in baselines(m, shape.n, shape.k).items():
            weight_bytes = shape.bf16_bytes if name.startswith("bf16") else shape.fp8_bytes
            rows.append(shape.measure(m, name, fn, xs, reference, weight_bytes, copy_gb_s))
        if m in FULL_GRID_ROWS:
            configs = [c for c in grid if useful(c, shape.n, shape.k)]
        else:  # the best few at M = 1 and 16, and their 8-token variants where M fits
            configs = []
            for full in FULL_GRID_ROWS:
                configs += [SkinnyFp8Config(**r["config"]) for r in best(results[full])[:TOP]]
            if m <= 8:
                configs += [replace(c, tokens=8) for c in configs]
            configs = list(dict.fromkeys(configs))
        late_skips, uncompiled = 0, 0
        for config in configs:
            if compiled.get(compile_key(config), "ok") != "ok":
                uncompiled += 1
            elif late():
                late_skips += 1
            else:
                rows.append(measure_skinny(shape, m, config, xs, reference, copy_gb_s, compiled))
        if m in FULL_GRID_ROWS and not late():  # variants of the best three
            for config in [SkinnyFp8Config(**r["config"]) for r in best(rows)[:TOP]]:
                variants = [replace(config, pdl=False)]
                if m <= 8:
                    variants.append(replace(config, tokens=8))
                if config.split_k > 1:
                    variants += [replace(config, split_k_mode=mode)
                                 for mode in ("atomic", "serial")]
                for variant in variants:
                    if not late() and compiled.get(compile_key(variant), "ok") == "ok":
                        rows.append(measure_skinny(shape, m, variant, xs, reference, copy_gb_s,
                                                   compiled))
        results[m] = rows
        shape.record["rows"][str(m)] = {"candidates": rows, "skipped_for_budget": late_skips,
                                        "skipped_not_compiled": uncompiled,
                                        "best_skinny": (best(rows) or [None])[0]}
        report(shape, m, rows)


def measure_skinny(shape, m, config, xs, reference, copy_gb_s, compiled: dict) -> dict:
    """One config; a variant that fails its first (compiling) call is not tried again."""
    row = shape.measure(m, "skinny_fp8 " + label(config),
                        lambda x, w, s, wb: skinny_fp8_linear(x, w, s, config=config),
                        xs, reference, shape.fp8_bytes, copy_gb_s)
    row["config"] = asdict(config)
    key = compile_key(config)
    if key not in compiled:
        compiled[key] = "ok" if "us" in row else {"error": row["error"]}
    return row


def best(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if "config" in r and "us" in r), key=lambda r: r["us"])


def report(shape: Shape, m: int, rows: list[dict]) -> None:
    def cell(row):
        return f"{row['us']:8.1f} {row['pct_copy']:5.1f}%" if "us" in row else "   error      "

    named = {r["name"]: r for r in rows if "config" not in r}
    top = (best(rows) or [None])[0]
    text = " ".join(cell(named[name]) for name in ("bf16_gemv", "bf16_cublas",
                                                    "fp8_quant_linear", "fp8_scaled_mm"))
    text += f" {cell(top)} {top['name'][11:]}" if top else "   (no skinny config ran)"
    print(f"{shape.name:8} M={m:2} {text}", flush=True)


def compile_all(grid: list[SkinnyFp8Config]) -> dict:
    """Compiles each distinct kernel variant of the grid on a small problem: M is not
    specialised and every N and K here is a multiple of 16, so the shapes share them. (The
    8-token, atomic, serial and no-PDL variants of the best configs compile when first
    measured.)"""
    k = 4096 if not ARGS.dry_run else 256
    weight, scale = quantize_weight(torch.randn(256, k, device=ARGS.device))
    x = torch.randn(1, k, device=ARGS.device).to(torch.bfloat16)
    compiled = {}
    for config in grid:
        key = compile_key(config)
        if key in compiled:
            continue
        if out_of_time(0.6):
            compiled[key] = "skipped: budget"
            continue
        try:
            skinny_fp8_linear(x, weight, scale, config=replace(config, split_k=min(
                config.split_k, 2)))
            synchronize()
            compiled[key] = "ok"
        except Exception as error:
            compiled[key] = error_record(error)
            print(f"compile {key}: {compiled[key]['error'][:160]}", flush=True)
            if "cuda_broken" in compiled[key]:
                break
    return compiled


def per_token_estimate(shapes: list[dict], copy_gb_s: float) -> dict:
    """All linears of one batch-1 token (32 layers + the LM head): the fastest measured
    candidate of each family at M = 1, and the weight-streaming roofline."""
    def weight(record):
        return 1 if record["shape"] == "lm_head" else LAYERS

    estimate = {}
    for family in ("bf16_gemv", "bf16_cublas", "fp8_quant_linear", "fp8_scaled_mm",
                   "skinny_fp8"):
        total = 0.0
        for record in shapes:
            rows = [r for r in record["rows"].get("1", {}).get("candidates", [])
                    if r["name"].startswith(family) and "us" in r]
            total += min((r["us"] for r in rows), default=math.nan) * weight(record)
        estimate[family] = round(total, 1)
    for dtype in ("fp8", "bf16"):
        nbytes = sum(r[f"{dtype}_weight_bytes"] * weight(r) for r in shapes)
        estimate[f"{dtype}_roofline"] = round(nbytes / copy_gb_s / 1e3, 1)
    return estimate  # µs per token


def main() -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ARGS.out.mkdir(parents=True, exist_ok=True)
    path = ARGS.out / f"skinny-sweep-{stamp}-{ARGS.device}.json"
    result = {"env": {"device": torch.cuda.get_device_name() if ARGS.device == "cuda" else "cpu",
                      "torch": torch.__version__, "triton": triton.__version__,
                      "dry_run": ARGS.dry_run, "budget_s": ARGS.budget,
                      "calls_per_graph": ARGS.calls, "replays": ARGS.replays},
              "shapes": []}

    def save():
        result["elapsed_s"] = round(time.perf_counter() - START, 1)
        path.write_text(json.dumps(result, indent=1, default=str))

    copy = copy_bandwidth()
    result["copy"] = copy
    print(f"copy {copy['gb_s']:.0f} GB/s (read + write; {copy['bytes'] >> 20} MiB)", flush=True)
    grid = config_grid()
    compiled = result["compile"] = compile_all(grid)
    ok = sum(status == "ok" for status in compiled.values())
    print(f"compiled {ok}/{len(compiled)} kernel variants ({time.perf_counter() - START:.0f} s)",
          flush=True)
    if any("cuda_broken" in status for status in compiled.values()):
        save()
        sys.exit(f"the CUDA context broke while compiling: see {path}")
    print(f"{'shape':8} {'M':3}  {'bf16 gemv':>14} {'bf16 cublas':>14} {'fp8 quant_lin':>14} "
          f"{'fp8 scaled_mm':>14} {'skinny fp8 best':>14} config   (µs, % of copy bandwidth)")
    shapes = DRY_SHAPES if ARGS.dry_run else SHAPES
    per_shape = sum(SLOT_WEIGHT[m in FULL_GRID_ROWS] for m in FULL_GRID_ROWS + FEW_ROWS)
    for index, (name, (n, k)) in enumerate(shapes.items()):
        record, shape = {"shape": name}, None
        try:
            shape = Shape(name, n, k)
            record = shape.record
            run_shape(shape, grid, compiled, copy["gb_s"], per_shape * (len(shapes) - index))
        except Exception as error:  # one shape failing is recorded; a broken context ends it
            record.update(error_record(error))
            print(f"{name}: {record['error']}", flush=True)
        finally:
            result["shapes"].append(record)
            shape = None  # frees its weight copies
            if ARGS.device == "cuda":
                torch.cuda.empty_cache()
            save()
        if "cuda_broken" in record:
            break
    estimate = result["per_token_estimate"] = per_token_estimate(
        [s for s in result["shapes"] if "rows" in s], copy["gb_s"])
    save()
    print("all linears of one token at M=1 (µs): "
          + ", ".join(f"{family} {us}" for family, us in estimate.items()))
    print(f"wrote {path} ({time.perf_counter() - START:.0f} s)")


if __name__ == "__main__":
    main()
