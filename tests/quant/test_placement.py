"""A method's parameters are loaded by their layouts alone, wherever the layer says this
rank's slice goes: packed ints along the input (row-parallel), group scales and per-channel
scales of fused q|k|v parts (column-parallel, KV heads shared by ranks), one scalar per fused
part. Checked on rank 1 of a tp-2 layout against slicing by hand (no collective runs, so the
process group is a stand-in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from kiln.errors import CheckpointError
from kiln.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kiln.parallel.state import ParallelState
from kiln.quant.base import QuantMethod, make_parameter
from kiln.quant.config import QuantConfig
from kiln.quant.placement import FeatureLayout

RANK_1_OF_2 = ParallelState(tp_rank=1, tp_size=2, tp_group=object())
PACK, GROUP = 8, 4


class PreQuantizedMethod(QuantMethod):
    """A pre-quantised checkpoint's tensors, loaded as they are (no after-loading step)."""

    def create_weights(self, layer, input_size: int, output_size: int) -> None:
        layer.qweight = make_parameter((output_size, input_size // PACK),
                                       FeatureLayout(input_block=PACK), torch.int32)
        layer.group_scale = make_parameter((output_size, input_size // GROUP),
                                           FeatureLayout(input_block=GROUP), torch.float8_e4m3fn)
        layer.weight_scale = make_parameter((len(layer.part_ids),),
                                            FeatureLayout(per_part=True), torch.float32)

    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        return ("qweight", "group_scale", "weight_scale")

    def apply(self, layer, x, bias):
        # These tests check where loaded tensors land; no forward ever runs through this
        # method (test_quant_scheme.py has a scheme with a real forward).
        raise AssertionError("PreQuantizedMethod is for placement tests: it has no forward")


@dataclass(frozen=True)
class PreQuantizedConfig(QuantConfig):
    scheme: ClassVar[str] = "test-prequantized"  # not registered: constructed directly

    def linear_method(self, prefix: str) -> QuantMethod:
        return PreQuantizedMethod()


def checkpoint_tensors(out_features: int, in_features: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "qweight": torch.randint(-2**31, 2**31 - 1, (out_features, in_features // PACK),
                                 dtype=torch.int32, generator=generator),
        "group_scale": torch.rand(out_features, in_features // GROUP, generator=generator)
        .to(torch.float8_e4m3fn),
        "weight_scale": torch.rand((), generator=generator),
    }


def load(layer, part_id, tensors, prefix: str) -> None:
    for name, tensor in tensors.items():
        layer.load_checkpoint_tensor(name, tensor, part_id=part_id, source_name=f"{prefix}.{name}")


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))


def test_row_parallel_takes_its_input_columns_in_packed_units():
    layer = RowParallelLinear(64, 8, bias=False, quant_config=PreQuantizedConfig(),
                              parallel=RANK_1_OF_2, prefix="down_proj")
    tensors = checkpoint_tensors(8, 64, seed=0)
    load(layer, None, tensors, "down_proj")
    # Rank 1 holds input features [32, 64): packed columns [4, 8), group columns [8, 16).
    assert_bits_equal(layer.qweight.data, tensors["qweight"][:, 4:8])
    assert_bits_equal(layer.group_scale.data, tensors["group_scale"][:, 8:16])
    assert layer.weight_scale.item() == tensors["weight_scale"].item()


def test_qkv_parts_land_at_their_rows_with_shared_kv_heads():
    # 4 query heads and 1 KV head of dim 8 over 2 ranks: each rank has 2 query heads and
    # the (replicated) KV head.
    layer = QKVParallelLinear(16, 8, 4, 1, bias=False, quant_config=PreQuantizedConfig(),
                              parallel=RANK_1_OF_2, prefix="qkv_proj")
    parts = {"q": checkpoint_tensors(32, 16, 1), "k": checkpoint_tensors(8, 16, 2),
             "v": checkpoint_tensors(8, 16, 3)}
    for part_id, tensors in parts.items():
        load(layer, part_id, tensors, f"{part_id}_proj")
    for name in ("qweight", "group_scale"):
        expected = torch.cat([parts["q"][name][16:32], parts["k"][name], parts["v"][name]])
        assert_bits_equal(getattr(layer, name).data, expected)
    assert layer.weight_scale.tolist() == [parts[p]["weight_scale"].item() for p in "qkv"]


def test_merged_parts_take_this_ranks_rows():
    layer = MergedColumnParallelLinear(16, [8, 8], bias=False, quant_config=PreQuantizedConfig(),
                                       parallel=RANK_1_OF_2, prefix="gate_up_proj")
    gate, up = checkpoint_tensors(8, 16, 4), checkpoint_tensors(8, 16, 5)
    load(layer, 0, gate, "gate_proj")
    load(layer, 1, up, "up_proj")
    assert_bits_equal(layer.qweight.data, torch.cat([gate["qweight"][4:], up["qweight"][4:]]))


def test_wrong_checkpoint_shape_is_named_in_whole_tensor_units():
    layer = RowParallelLinear(64, 8, bias=False, quant_config=PreQuantizedConfig(),
                              parallel=RANK_1_OF_2, prefix="down_proj")
    with pytest.raises(CheckpointError, match=r"tensor 'down_proj.qweight' has shape \(8, 4\), "
                                              r"expected \(8, 8\)"):
        layer.load_checkpoint_tensor("qweight", torch.zeros(8, 4, dtype=torch.int32),
                                     source_name="down_proj.qweight")


def test_slice_that_splits_a_block_is_refused():
    # 24 input features over 2 ranks: 12 each, not a whole number of 8-feature int32 words.
    with pytest.raises(ValueError, match=r"input slice start of 12 features does not split "
                                         r"into blocks of 8"):
        layer = RowParallelLinear(24, 8, bias=False, quant_config=PreQuantizedConfig(),
                                  parallel=RANK_1_OF_2, prefix="down_proj")
        load(layer, None, checkpoint_tensors(8, 24, 6), "down_proj")
