"""Aligned target + draft engines for the speculative-decoding mechanism ceiling.

From one built engine (e.g. `kiln build llama-3.1-8b --random-weights`):

    target  the engine itself, with o_proj and down_proj zeroed in every layer from
            --draft-layers on: those layers add nothing to the residual stream, so the
            target's logits are those of its first layers + final norm + head (it still
            reads and computes every layer: its step costs what the real model's does)
    draft   a new engine of those first layers + the same norm and head

The draft's argmax is then the target's: acceptance is exactly 100 % and what the benchmark
measures is the mechanism's own overhead. The target is edited in place (bytes of the
zeroed tensors overwritten in its safetensors file): its recorded sha256 no longer match,
so open it with verify_hashes=False (the benchmark does). Normal builds are untouched.

    python benchmarks/spec_aligned_engines.py ENGINE DRAFT_OUT [--draft-layers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path

from safetensors import safe_open

from kiln.compiler.manifest import open_engine, write_engine

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ZEROED = (".self_attn.o_proj.weight", ".mlp.down_proj.weight")


def zero_upper_layers(engine_dir: Path, keep_layers: int) -> int:
    """Overwrite o_proj / down_proj of layers >= keep_layers with zeros, in place; returns
    the bytes zeroed."""
    path = engine_dir / "rank0.safetensors"
    with path.open("r+b") as file:
        header_len = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(header_len))
        base = 8 + header_len
        zeroed = 0
        for name, entry in header.items():
            match = _LAYER.match(name)
            if not match or int(match.group(1)) < keep_layers or not name.endswith(_ZEROED):
                continue
            start, end = entry["data_offsets"]
            file.seek(base + start)
            remaining = end - start
            block = bytes(1 << 24)
            while remaining:
                count = min(remaining, len(block))
                file.write(block[:count])
                remaining -= count
            zeroed += end - start
    return zeroed


def write_draft(engine_dir: Path, draft_dir: Path, keep_layers: int) -> Path:
    info = open_engine(engine_dir, verify_hashes=False)
    tensors = {}
    with safe_open(str(engine_dir / "rank0.safetensors"), "pt") as handle:
        for name in handle.keys():
            match = _LAYER.match(name)
            if match is None or int(match.group(1)) < keep_layers:
                tensors[name] = handle.get_tensor(name)
    config = info.model_config
    windows = tuple(config.sliding_windows[:keep_layers]) if config.sliding_windows else ()
    draft_config = dataclasses.replace(config, num_layers=keep_layers, sliding_windows=windows)
    tokenizer = info.tokenizer_dir
    manifest = info.manifest
    return write_engine(
        draft_dir, rank_weights=[tensors], layout=info.layout, quant_config=info.quant_config,
        model_config=draft_config, build=manifest["build"],
        source={"path": str(engine_dir), "files": {}, "derived": f"first {keep_layers} layers"},
        generation_config=info.generation_config,
        save_tokenizer=(lambda out: shutil.copytree(tokenizer, out)) if tokenizer else None,
        force=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("draft_out", type=Path)
    parser.add_argument("--draft-layers", type=int, default=2)
    args = parser.parse_args()
    write_draft(args.engine, args.draft_out, args.draft_layers)
    zeroed = zero_upper_layers(args.engine, args.draft_layers)
    print(f"draft of {args.draft_layers} layers in {args.draft_out}; zeroed {zeroed / 2**30:.1f} "
          f"GiB of o_proj/down_proj in {args.engine}")


if __name__ == "__main__":
    main()
