"""Bad quantised checkpoints are refused with one line naming the tensor or config field:
non-finite scales (zero and negative weight scales are legitimate and kept), config fields of
the wrong type or that kiln cannot honour, tensors of the wrong shape or dtype before they are
unpacked; and a build that meets one leaves no engine directory behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.checkpoint.hf import read_hf_directory
from kiln.checkpoint.packing import unpack_int32_bytes
from kiln.cli import main
from kiln.errors import CheckpointError
from tests.checkpoint.quantized_writers import (
    write_awq, write_compressed_tensors, write_gptq, write_modelopt_fp8,
)
from tests.compiler.test_build_errors import assert_nothing_left, assert_one_line_error

M = "model.layers.0.mlp.down_proj"  # tiny Llama: 64 input features, 32 outputs
CORRUPT = "; the checkpoint is corrupt"
# M's scales as written (groups of 16): (groups, out)
SCALES = "expected (4, 32) (quantization_config.group_size 16 over 64 input features)"

WRITERS = {
    "awq": write_awq,
    "gptq": write_gptq,
    "gptq8": lambda d: write_gptq(d, bits=8, with_g_idx=False),
    "ct-int4": lambda d: write_compressed_tensors(d, "int4"),
    "ct-int8": lambda d: write_compressed_tensors(d, "int8"),
    "ct-fp8": lambda d: write_compressed_tensors(d, "fp8"),
    "modelopt": write_modelopt_fp8,
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each format's checkpoint, written once per module on first use."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = tmp_path_factory.mktemp(kind) / "model"
            WRITERS[kind](cache[kind])
        return cache[kind]

    return get


def _copy(written, kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written(kind), tmp_path / "model"))


def _edit_tensors(directory: Path, edit) -> None:
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, str(directory / "model.safetensors"))


def _set_tensor(directory: Path, name: str, change) -> None:
    _edit_tensors(directory, lambda state: state.__setitem__(name, change(state[name])))


def _edit_quant_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def _with(values: dict):
    """A tensor change: the given positions set to the given values."""
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        for position, value in values.items():
            tensor[position] = value
        return tensor
    return change


def _read_module(directory: Path, module: str = M) -> dict[str, torch.Tensor]:
    """Every tensor kiln hands out for `module` (conversion, and its checks, run on get)."""
    tensors = read_hf_directory(directory).tensors
    return {n: tensors.get(n) for n in tensors.names() if n.startswith(module + ".")}


def _refused(directory: Path, message: str) -> None:
    """The reader refuses with exactly `message` (the config's path may come before it)."""
    with pytest.raises(CheckpointError, match=re.escape(message) + "$"):
        _read_module(directory)


nan, inf = float("nan"), float("inf")


# ─── 1. non-finite scales ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kind, suffix, values, message", [
    ("awq", "scales", {(0, 3): nan, (2, 5): nan}, "has 2 non-finite values (first: nan at [0, 3])"),
    ("gptq", "scales", {(1, 0): inf}, "has 1 non-finite value (first: inf at [1, 0])"),
    ("gptq8", "scales", {(0, 7): -inf}, "has 1 non-finite value (first: -inf at [0, 7])"),
    ("ct-int4", "weight_scale", {(5, 1): nan}, "has 1 non-finite value (first: nan at [5, 1])"),
    ("ct-int8", "weight_scale", {(3, 0): inf}, "has 1 non-finite value (first: inf at [3, 0])"),
    ("ct-fp8", "weight_scale", {(31, 0): nan, (4, 0): inf},
     "has 2 non-finite values (first: inf at [4, 0])"),
    ("ct-fp8", "input_scale", {0: nan}, "has 1 non-finite value (first: nan at [0])"),
    ("modelopt", "weight_scale", {(): inf}, "has 1 non-finite value (first: inf)"),
    ("modelopt", "input_scale", {(): nan}, "has 1 non-finite value (first: nan)"),
])
def test_non_finite_scales_are_refused_naming_the_first(written, tmp_path, kind, suffix, values,
                                                         message):
    source = _copy(written, kind, tmp_path)
    _set_tensor(source, f"{M}.{suffix}", _with(values))
    _refused(source, f"tensor {M}.{suffix} {message}{CORRUPT}")


@pytest.mark.parametrize("kind, suffix, shown", [
    ("ct-int8", "weight_scale", "weight_scale"), ("ct-int4", "weight_scale", "'s scales"),
])
def test_scales_beyond_float16_are_refused(written, tmp_path, kind, suffix, shown):
    """kiln stores int scales in float16: a finite float32 scale past 65504 would become inf
    (NaN outputs) without a word."""
    source = _copy(written, kind, tmp_path)
    _set_tensor(source, f"{M}.{suffix}", lambda t: _with({(2, 0): 1e6})(t.float()))
    name = f"{M}.{suffix}" if shown == suffix else f"{M}{shown}"
    with pytest.raises(CheckpointError, match=re.escape(
            f"tensor {name} holds 1000000.0 at [2, 0], beyond float16's range")):
        _read_module(source)


@pytest.mark.parametrize("kind, suffix, change, kept", [
    ("awq", "scales", torch.zeros_like, lambda s: s == 0),  # a zero group: all its weights 0
    ("ct-fp8", "weight_scale", torch.neg, lambda s: s < 0),
    ("modelopt", "weight_scale", torch.zeros_like, lambda s: s == 0),
])
def test_zero_and_negative_weight_scales_are_kept(written, tmp_path, kind, suffix, change, kept):
    source = _copy(written, kind, tmp_path)
    _set_tensor(source, f"{M}.{suffix}", change)
    assert bool(kept(_read_module(source)[f"{M}.weight_scale"]).all())


@pytest.mark.parametrize("kind, value, shown", [
    ("ct-fp8", 0.0, "0.0"), ("modelopt", -0.5, "-0.5"), ("modelopt", 0.0, "0.0"),
])
def test_input_scale_must_be_positive(written, tmp_path, kind, value, shown):
    source = _copy(written, kind, tmp_path)
    _set_tensor(source, f"{M}.input_scale", lambda t: torch.full_like(t, value))
    _refused(source, f"tensor {M}.input_scale = {shown}: expected a positive scale "
                     "(activations are divided by it)")


# ─── 2. compressed-tensors config: types, and fields kiln cannot honour ─────────────────

GROUP = "quantization_config.config_groups.group_0"


def _group(config: dict) -> dict:
    return config["config_groups"]["group_0"]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["config_groups"].__setitem__("group_0", []), f"{GROUP} = []: expected an object"),
    (lambda c: _group(c).__setitem__("weights", "int4"),
     f"{GROUP}.weights = 'int4': expected an object"),
    (lambda c: _group(c).pop("weights"), f"{GROUP}.weights = None: expected an object"),
    (lambda c: _group(c).__setitem__("input_activations", "fp8"),
     f"{GROUP}.input_activations = 'fp8': expected an object"),
] + [
    (lambda c, v=v: _group(c)["weights"].__setitem__("group_size", v),
     f"{GROUP}.weights.group_size = {v!r}: strategy group needs a positive integer group size")
    for v in (None, 16.0, "16", 0, -1, True)
])
def test_compressed_tensors_config_types(written, tmp_path, edit, message):
    source = _copy(written, "ct-int4", tmp_path)
    _edit_quant_config(source, edit)
    _refused(source, message)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.__setitem__("transform_config", {"config_groups": {"R1": {"type": "hadamard"}}}),
     "quantization_config.transform_config = {'config_groups': {'R1': {'type': 'hadamard'}}}: "
     "transforms (rotations of the weights) are not supported"),
    (lambda c: c.__setitem__("sparsity_config", {"format": "sparse-24-bitmask"}),
     "quantization_config.sparsity_config = {'format': 'sparse-24-bitmask'}: sparse "
     "compression formats are not supported"),
    (lambda c: _group(c).__setitem__("output_activations", {"num_bits": 8, "type": "int"}),
     f"{GROUP}.output_activations = {{'num_bits': 8, 'type': 'int'}}: quantised output "
     "activations are not supported"),
] + [
    (lambda c, v=v: _group(c)["weights"].__setitem__("actorder", v),
     f"{GROUP}.weights.actorder = {v!r}: activation-ordered groups are not supported; "
     "expected null or weight")
    for v in ("group", "dynamic", True)
])
def test_compressed_tensors_fields_kiln_cannot_honour(written, tmp_path, edit, message):
    source = _copy(written, "ct-int4", tmp_path)
    _edit_quant_config(source, edit)
    _refused(source, message)


def test_a_long_config_value_is_cut_in_the_message(written, tmp_path):
    source = _copy(written, "ct-int4", tmp_path)
    rotations = {f"R{i}": {"type": "hadamard", "head_dim": 128} for i in range(20)}
    _edit_quant_config(source, lambda c: c.__setitem__("transform_config", rotations))
    with pytest.raises(CheckpointError) as error:
        _read_module(source)
    value = str(error.value).split("transform_config = ")[1].split(": transforms")[0]
    assert len(value) == 80 and value.endswith("..."), value


@pytest.mark.parametrize("edit", [
    lambda c: _group(c)["weights"].__setitem__("actorder", "weight"),
    lambda c: _group(c)["weights"].__setitem__("actorder", "static"),
    lambda c: _group(c)["weights"].__setitem__("actorder", False),
    lambda c: c.__setitem__("sparsity_config", {"format": "dense", "global_sparsity": 0.0}),
    lambda c: c.__setitem__("transform_config", None),
], ids=["actorder-weight", "actorder-static", "actorder-false", "sparsity-dense", "no-transform"])
def test_compressed_tensors_fields_that_change_nothing_are_accepted(written, tmp_path, edit):
    # actorder "weight" (alias "static") only reorders GPTQ's visit of the columns: the
    # package documents the stored format as unchanged; "dense" is its identity format.
    source = _copy(written, "ct-int4", tmp_path)
    reference = _read_module(source)
    _edit_quant_config(source, edit)
    for name, tensor in _read_module(source).items():
        assert torch.equal(tensor, reference[name]), name


# ─── 3. shapes and dtypes before unpacking ────────────────────────────────────────────


FLOATS = "expected float16, bfloat16 or float32"


@pytest.mark.parametrize("kind, suffix, change, message", [
    ("gptq", "scales", lambda t: t[0].contiguous(), f"has shape (32,), {SCALES}"),
    ("gptq", "scales", lambda t: t.repeat(64, 1), f"has shape (256, 32), {SCALES}"),
    ("gptq8", "scales", lambda t: t.T.contiguous(), f"has shape (32, 4), {SCALES}"),
    ("awq", "scales", lambda t: t[0].contiguous(), f"has shape (32,), {SCALES}"),
    ("awq", "scales", lambda t: t.to(torch.int32), f"is int32, {FLOATS}"),
    ("gptq", "scales", lambda t: t.to(torch.int16), f"is int16, {FLOATS}"),
    ("awq", "qweight", lambda t: t.flatten(), "has shape (256,), expected (in, out/8)"),
    ("modelopt", "input_scale", lambda t: torch.tensor([0.03, 0.04]),
     "has shape (2,), expected one value (a static per-tensor input scale)"),
    ("ct-int4", "weight_shape", lambda t: t[:1].contiguous(), "has shape (1,), expected (2,)"),
    ("ct-int4", "weight_shape", lambda t: t.float(), "is float32, expected int32 or int64"),
    ("ct-int8", "weight_shape", lambda t: torch.tensor([32, -5]),
     "= [32, -5]: expected two positive sizes (out, in)"),
])
def test_tensor_shapes_and_dtypes_are_checked(written, tmp_path, kind, suffix, change, message):
    source = _copy(written, kind, tmp_path)
    _set_tensor(source, f"{M}.{suffix}", change)
    _refused(source, f"tensor {M}.{suffix} {message}")


@pytest.mark.parametrize("kind, weight_shape, expected", [
    ("ct-int4", [10**6, 10**6], "(1000000, 125000)"),  # today: read as if it were (32, 64)
    ("ct-int4", [32, 128], "(32, 16)"),
    ("ct-int8", [16, 64], "(16, 16)"),
])
def test_weight_shape_must_match_weight_packed(written, tmp_path, kind, weight_shape, expected):
    source = _copy(written, kind, tmp_path)
    _set_tensor(source, f"{M}.weight_shape", lambda t: torch.tensor(weight_shape))
    packed = load_file(source / "model.safetensors")[f"{M}.weight_packed"].shape
    _refused(source, f"tensor {M}.weight_packed has shape {tuple(packed)}, expected {expected} "
                     f"for weight_shape {weight_shape}")


def _as_int_quantized(directory: Path, dtype: torch.dtype) -> None:
    """ct-int8's pack-quantized weights rewritten as int-quantized `weight` tensors."""
    def edit(state):
        for packed_name in [n for n in state if n.endswith(".weight_packed")]:
            module = packed_name.removesuffix(".weight_packed")
            columns = int(state.pop(f"{module}.weight_shape")[1])
            weight = unpack_int32_bytes(state.pop(packed_name))[:, :columns] - 128
            state[f"{module}.weight"] = weight.to(dtype)
    _edit_tensors(directory, edit)
    _edit_quant_config(directory, lambda c: (c.__setitem__("format", "int-quantized"),
                                             _group(c).__setitem__("format", "int-quantized")))


def test_int_quantized_weight_must_be_int8(written, tmp_path):
    source = _copy(written, "ct-int8", tmp_path)
    packed = _read_module(source)[f"{M}.weight"]
    _as_int_quantized(source, torch.int8)
    assert torch.equal(_read_module(source)[f"{M}.weight"], packed)
    _as_int_quantized(_copy(written, "ct-int8", tmp_path / "f"), torch.float32)
    # a float 300 would have been stored as 44 (wrapped) by a plain conversion
    _refused(tmp_path / "f" / "model", f"tensor {M}.weight is float32, expected int8")


# ─── 4, 5. the messages name the real problem and the file's tensor ───────────────────


def test_short_g_idx_is_a_length_mismatch(written, tmp_path):
    source = _copy(written, "gptq", tmp_path)
    _set_tensor(source, f"{M}.g_idx", lambda t: t[:4].contiguous())
    _refused(source, f"tensor {M}.g_idx has shape (4,), expected (64,) (one group index per "
                     "input column)")


def test_awq_group_size_mismatch_names_the_files_scales(written, tmp_path):
    source = _copy(written, "awq", tmp_path)  # written with groups of 16
    _edit_quant_config(source, lambda c: c.__setitem__("group_size", 32))
    _refused(source, f"tensor {M}.scales has shape (4, 32), expected (2, 32) "
                     "(quantization_config.group_size 32 over 64 input features)")


# ─── builds: one line, no engine left ─────────────────────────────────────────────────


def _set_scale_nan(source: Path) -> None:
    _set_tensor(source, f"{M}.scales", _with({(0, 3): nan}))


@pytest.mark.parametrize("kind, mutate, message", [
    ("awq", _set_scale_nan,
     f"tensor {M}.scales has 1 non-finite value (first: nan at [0, 3]){CORRUPT}"),
    ("modelopt", lambda s: _set_tensor(s, f"{M}.input_scale", torch.zeros_like),
     f"tensor {M}.input_scale = 0.0: expected a positive scale"),
    ("ct-int8", lambda s: _as_int_quantized(s, torch.float32),
     ".weight is float32, expected int8"),
    ("ct-int4", lambda s: _edit_quant_config(
        s, lambda c: _group(c)["weights"].__setitem__("actorder", "group")),
     f"{GROUP}.weights.actorder = 'group'"),
    ("awq", lambda s: _edit_quant_config(s, lambda c: c.__setitem__("group_size", 32)),
     "(quantization_config.group_size 32 over"),
])
def test_a_build_refuses_in_one_line_and_leaves_nothing(written, tmp_path, capsys, kind, mutate,
                                                        message):
    source = _copy(written, kind, tmp_path)
    mutate(source)
    code = main(["build", str(source), "-o", str(tmp_path / "engine"), "--dtype", "float32",
                 "--quant", "keep"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, message)
    assert "--group-size" not in err and "weight_scale" not in err
    assert_nothing_left(tmp_path, "engine")
