"""AWQ: the grid search never does worse than round-to-nearest on its own measure and beats
it where a few input channels carry large activations; folding the scales leaves the
full-precision model's function unchanged (norms, up rows, v rows with grouped KV heads),
for int4-wo and int8-wo; a calibrating build of either records awq and sits closer to the
full-precision model than round-to-nearest, and fp8 builds never run it; on a model it cannot
fold into (GPT-2) int8-wo rounds to nearest and int4-wo is refused in one line."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.evaluate.forward import TeacherForcedModel
from kiln.layers.linear import LinearBase
from kiln.models.llama import LlamaForCausalLM
from kiln.kernels.quant_linear import dequantize_int4
from kiln.quant.awq import AWQ_SCHEMES, apply_awq, search_scales
from kiln.quant.calibration import LinearStatistics
from kiln.quant.config import quant_config_for_build
from kiln.quant.quantize import FULL_PRECISION, quantize_int4
from kiln.runtime.input_batch import BatchRow, prepare_inputs
from kiln.runtime.kv_tensors import KVCacheSpec, allocate_kv_caches
from kiln.compiler.builder import model_config_from_hf
from tests.helpers import save_tiny_hf_model, tiny_llama_config
from tests.quant.quant_helpers import tiny_gguf_and_text


def test_search_beats_round_to_nearest_with_outlier_channels():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator) * 0.02
    inputs = torch.randn(256, 128, generator=generator)
    inputs[:, :4] *= 30.0  # a few salient channels, as in real activations
    def fake_quantize(w):  # int4 g32 with zero points, by the build's round-to-nearest
        return dequantize_int4(*quantize_int4(w, 32, True))

    s, alpha, error, rtn_error = search_scales(weight, inputs, inputs.abs().mean(0), fake_quantize)
    reference = inputs @ weight.T
    rtn = float((inputs @ fake_quantize(weight).T - reference).pow(2).mean())
    assert rtn_error == rtn  # α = 0 is plain round-to-nearest
    assert alpha > 0 and error < 0.8 * rtn_error
    assert s.shape == (128,) and bool((s[:4] > s[4:].max()).all())


def _tiny_model(tmp_path, scheme="int4-wo"):
    config = tiny_llama_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                               intermediate_size=128)
    hf = save_tiny_hf_model(config, tmp_path / "hf")
    import json

    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    quant = quant_config_for_build(scheme, {"group_size": 32 if scheme == "int4-wo" else -1})
    torch.set_default_dtype(torch.float32)
    model = LlamaForCausalLM(model_config_from_hf(hf_config), quant_config=quant)
    model.load_checkpoint_weights(hf.state_dict().items(), process=False)
    return model


def _forward(model, tokens):
    spec = KVCacheSpec.of_model(model, torch.float32)
    caches = allocate_kv_caches(spec, 8, 4)
    row = BatchRow(request_id="r", token_ids=tokens, num_computed_tokens=0,
                   block_ids=[1, 2, 3, 4, 5], logits_offsets=tuple(range(len(tokens))))
    inputs = prepare_inputs([row], 4)
    return model.compute_logits(model(inputs.input_ids, inputs.positions, caches, inputs.metadata))


@pytest.mark.parametrize("scheme", AWQ_SCHEMES)
@torch.no_grad()
def test_folding_keeps_the_full_precision_model(tmp_path, scheme):
    model = _tiny_model(tmp_path, scheme)
    tokens = [1, 5, 9, 13, 2, 7, 30, 11, 4, 6, 8, 12, 14, 3, 17, 19]
    before = _forward(model, tokens)
    # Statistics from a forward (as calibration gathers them), skewed so every α > 0 wins.
    stats: dict[str, LinearStatistics] = {}

    def hook(module, inputs):
        x = inputs[0].float()
        x = x * torch.linspace(0.2, 5.0, x.shape[1])
        stats[module.prefix] = LinearStatistics(amax=float(x.abs().max()), abs_sum=x.abs().sum(0),
                                                tokens=x.shape[0], rows=[x])
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, LinearBase)
               and getattr(m, FULL_PRECISION, None) is not None]
    _forward(model, tokens)
    for handle in handles:
        handle.remove()
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    v_before = getattr(model.model.layers[0].self_attn.qkv_proj, FULL_PRECISION)[-32:].clone()
    chosen = apply_awq(model, stats, progress=False)
    assert set(chosen) == set(stats)  # every quantised linear searched, o_proj included
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    if chosen["model.layers.0.self_attn.o_proj"] > 0:
        v_after = getattr(model.model.layers[0].self_attn.qkv_proj, FULL_PRECISION)[-32:]
        assert not torch.equal(v_after, v_before)
    after = _forward(model, tokens)
    # Exact math in float32: only rounding of the scaled weights differs.
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tiny_gguf_and_text(tmp_path_factory.mktemp("awq"),
                                   ["hello", "world", "he", "or", "ld", "abc", "xyz"])
    build_engine(directory / "tiny.gguf", directory / "plain", BuildConfig(dtype="float32"),
                 progress=False)
    return directory


@pytest.mark.parametrize("scheme", ["int8-wo", "int4-wo", "fp8"])
def test_a_calibrating_build_runs_awq_for_integer_schemes_only(tiny, tmp_path, scheme):
    group = {"group_size": 32} if scheme == "int4-wo" else {}
    # Held-out ids: the calibration text's tokens mixed differently.
    ids = torch.randint(0, 48, (96,), generator=torch.Generator().manual_seed(5)).tolist()
    plain = TeacherForcedModel(tiny / "plain", device="cpu").logits(ids)
    errors = {}
    for calibration in (None, str(tiny / "text.txt")):
        engine = tmp_path / ("calibrated" if calibration else "nearest")
        build_engine(tiny / "tiny.gguf", engine,
                     BuildConfig(dtype="float32", quant=scheme, calibration=calibration,
                                 calibration_samples=8 if calibration else None, **group),
                     progress=False)
        awq = open_engine(engine).manifest["quant"].get("awq")
        assert awq is (bool(calibration) if scheme in AWQ_SCHEMES else None)
        quantised = TeacherForcedModel(engine, device="cpu").logits(ids)
        errors[calibration is not None] = float((quantised - plain).pow(2).mean())
    if scheme in AWQ_SCHEMES:
        assert errors[True] < errors[False]


def test_gptq_rounds_without_awq(tiny, tmp_path):
    # Layer-by-layer GPTQ does better alone at 8 and 4 bits (SmolLM2, BENCHMARKS.md).
    for scheme, group in (("int8-wo", {}), ("int4-wo", {"group_size": 32})):
        config = BuildConfig(dtype="float32", quant=scheme, calibration=str(tiny / "text.txt"),
                             calibration_samples=8, gptq=True, **group)
        build_engine(tiny / "tiny.gguf", tmp_path / scheme, config, progress=False)
        quant = open_engine(tmp_path / scheme).manifest["quant"]
        assert quant["gptq"] is True and quant.get("awq") in (None, False)


def test_a_model_awq_cannot_fold_into(tmp_path):
    save_tiny_hf_model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                               n_positions=128, bos_token_id=0, eos_token_id=0),
                       tmp_path / "hf")

    def build(scheme, **options):  # random-weight builds calibrate on random ids
        build_engine(tmp_path / "hf", tmp_path / scheme,
                     BuildConfig(dtype="float32", quant=scheme, calibration="sharegpt",
                                 calibration_samples=8, random_weights=True, **options),
                     progress=False)
        return open_engine(tmp_path / scheme).manifest["quant"]

    quant = build("int8-wo", kv_cache_dtype="fp8")
    assert quant["awq"] is False and quant["calibration"] == "sharegpt"
    with pytest.raises(KilnError, match="^AWQ needs a Llama-family model; GPT2LMHeadModel is not "
                                        r"one \(build int4-wo without --calibration, or "
                                        r"with --gptq, which rounds without AWQ\)$"):
        build("int4-wo", group_size=32)
    assert not (tmp_path / "int4-wo").exists()
    quant = build("int4-wo", group_size=32, gptq=True)  # GPTQ alone: no AWQ to refuse
    assert quant["gptq"] is True and not quant.get("awq")


def test_a_checkpoint_kept_quantised_never_runs_awq():
    """--quant keep with --calibration measures only the FP8 KV scales: the checkpoint's
    weights are rounded already, so no activation rows are kept and nothing is searched."""
    from kiln.quant.awq import runs_awq
    from kiln.quant.config import quant_config_from_manifest

    config = model_config_from_hf({**tiny_llama_config().to_dict(),
                                   "architectures": ["LlamaForCausalLM"]})
    kept = quant_config_from_manifest({"scheme": "int4-wo", "group_size": 16,
                                       "zero_point": True, "prequantized": True,
                                       "source_format": "awq"})
    built = quant_config_for_build("int4-wo", {"group_size": 16})
    assert not runs_awq(LlamaForCausalLM(config, quant_config=kept), "int4-wo")
    assert runs_awq(LlamaForCausalLM(config, quant_config=built), "int4-wo")
