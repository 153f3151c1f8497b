"""Bad speculative settings get one line naming the problem, from the Python API and the
CLI, before anything is loaded."""

from __future__ import annotations

import pytest

import shutil

from kiln.cli import main
from kiln.compiler.manifest import open_engine
from kiln.config import EngineConfig
from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine
from kiln.spec.config import SpeculativeConfig
from tests.helpers import build_tiny_engine


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "medusa"}, "unknown speculative method 'medusa'; use one of ngram, draft, random"),
    ({"method": "ngram", "num_speculative_tokens": -1}, "num_speculative_tokens must be an integer from 1 to 16, got -1"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens must be an integer from 1 to 16, got 17"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "num_speculative_tokens must be an integer"),
    ({"method": "draft"}, "speculative method 'draft' needs a draft engine"),
    ({"method": "ngram", "model": "/x"}, "only used by method 'draft'"),
    ({"method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_min 3 exceeds ngram_max 2"),
    ({"method": "ngram", "lookahead": 3}, "unknown field 'lookahead'"),
    ({}, "unknown speculative method None"),
])
def test_bad_config_is_one_line(values, message):
    with pytest.raises(KilnError) as error:
        SpeculativeConfig.from_dict(values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_vllm_shape_and_aliases():
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5,
                                          "prompt_lookup_max": 5, "prompt_lookup_min": 2})
    assert (config.num_speculative_tokens, config.ngram_max, config.ngram_min) == (5, 5, 2)
    assert SpeculativeConfig.from_dict({"model": "/engines/small"}).method == "draft"
    assert SpeculativeConfig.from_dict(None) is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--speculative", "medusa"], "unknown speculative method 'medusa'"),
    (["--speculative", "ngram", "--num-speculative-tokens", "-1"], "from 1 to 16, got -1"),
    (["--speculative", "ngram", "--num-speculative-tokens", "17"], "from 1 to 16, got 17"),
    (["--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative"),
    (["--speculative", "draft"], "needs a draft engine"),
])
@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_cli_refuses_bad_flags_in_one_line(command, flags, message, capsys, tmp_path):
    argv = {"generate": ["generate", str(tmp_path), "--prompt", "hi"],
            "serve": ["serve", str(tmp_path)],
            "bench": ["bench", "latency", str(tmp_path)]}[command]
    assert main(argv + flags) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error: ") and message in err and "\n" not in err


def test_a_draft_with_another_vocabulary_or_tokenizer_is_refused_in_one_line(tmp_path):
    target = build_tiny_engine(tmp_path / "target", vocab_size=64)
    draft = build_tiny_engine(tmp_path / "draft", vocab_size=96)
    config = EngineConfig(device="cpu", num_kv_blocks=32, block_size=4)
    with pytest.raises(KilnError) as error:
        LLMEngine(open_engine(target), config, {"method": "draft", "model": str(draft)})
    text = str(error.value)
    assert "vocabulary of 96 tokens, the target 64" in text and "\n" not in text

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(target, other_tokenizer)
    (other_tokenizer / "tokenizer").mkdir()
    (other_tokenizer / "tokenizer" / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(KilnError) as error:
        LLMEngine(open_engine(target), config, {"method": "draft", "model": str(other_tokenizer)})
    text = str(error.value)
    assert "different tokenizer from the target" in text and "\n" not in text
