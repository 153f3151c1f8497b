"""`kiln eval`: perplexity against transformers' own logits on the same windows, an engine
compared with itself and with a different one, the JSON shape, the text sources and their
split, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from kiln.cli import main
from kiln.evaluate.corpus import file_documents, token_stream
from kiln.evaluate.forward import TeacherForcedModel
from kiln.evaluate.perplexity import evaluate, kl_and_agreement, windows
from tests.helpers import build_tiny_engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval")
    return directory, build_tiny_engine(directory)


def _tokens(count: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 64, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_windows_cover_the_stream_and_stop_at_num_tokens():
    ids = list(range(100))
    chunks = windows(ids, 16, 1000)
    assert [len(c) for c in chunks] == [16] * 6 + [4]
    assert sum(len(c) - 1 for c in windows(ids, 16, 20)) == 20
    assert windows([1], 16, 10) == []


def test_perplexity_matches_transformers_on_the_same_windows(tiny):
    directory, engine = tiny
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory / "hf").eval()
    ids = _tokens(70)
    model = TeacherForcedModel(engine, device="cpu", max_window=32)
    result = evaluate(model, ids, window=32, num_tokens=60, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows(ids, 32, 60):
            logits = hf(torch.tensor([chunk])).logits[0, :-1].float()
            nll -= float(torch.log_softmax(logits, -1).gather(1, torch.tensor(chunk[1:])[:, None]).sum())
            count += len(chunk) - 1
    assert result.num_tokens == count == 60
    # float32 both sides; kiln's attention and norms sum in a different order.
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_an_engine_compared_with_itself_agrees_everywhere(tiny):
    _, engine = tiny
    model = TeacherForcedModel(engine, device="cpu", max_window=32)
    result = evaluate(model, _tokens(50), window=32, num_tokens=40, other=model, progress=False)
    assert result.compare.top1_agreement == 1.0
    assert result.compare.ppl_delta_pct == 0.0
    assert abs(result.compare.mean_kl) < 1e-6


def test_compare_with_a_different_model_and_json_shape(tiny, tmp_path, capsys):
    _, engine = tiny
    from kiln.compiler.builder import build_engine
    from kiln.config import BuildConfig
    from tests.helpers import save_tiny_hf_model, tiny_llama_config

    # Same shapes, another seed: a genuinely different model.
    save_tiny_hf_model(tiny_llama_config(), tmp_path / "hf2", seed=5)
    build_engine(tmp_path / "hf2", tmp_path / "e2", BuildConfig(dtype="float32"), progress=False)
    text = tmp_path / "text.jsonl"
    # A tiny engine has no tokenizer: evaluate directly, then check the CLI's refusal.
    model = TeacherForcedModel(engine, device="cpu", max_window=32)
    different = TeacherForcedModel(tmp_path / "e2", device="cpu", max_window=32)
    result = evaluate(model, _tokens(50), window=32, num_tokens=40, other=different, progress=False)
    assert 0.0 <= result.compare.top1_agreement < 1.0
    assert result.compare.mean_kl > 0.01
    payload = result.to_json()
    assert set(payload) == {"perplexity", "num_tokens", "compare"}
    assert set(payload["compare"]) == {"perplexity", "ppl_delta_pct", "top1_agreement", "mean_kl"}
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    assert main(["eval", str(engine), "--dataset-path", str(text), "--device", "cpu"]) == 1
    assert "has no tokenizer" in capsys.readouterr().err


def test_text_files_jsonl_and_paragraphs(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n"two"\n')
    assert list(file_documents(jsonl)) == ["one", "two"]
    plain = tmp_path / "a.txt"
    plain.write_text("first para\n\nsecond\n\n\n")
    assert list(file_documents(plain)) == ["first para", "second"]

    class Chars:
        def encode(self, text, add_special_tokens=False, verbose=True):
            return [ord(c) for c in text]

    assert len(token_stream(Chars(), iter(["abc", "defg"]), 3)) == 5  # stops after enough


@pytest.mark.parametrize("content, message", [
    ('{"text": 3}\n', "a.jsonl:1: expected a string"),
    ("{oops\n", "a.jsonl:1: not valid JSON"),
])
def test_bad_text_files_name_the_line(tmp_path, content, message):
    from kiln.errors import KilnError

    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(KilnError, match=message):
        list(file_documents(path))


def test_eval_refuses_a_bad_token_count(tiny, capsys):
    _, engine = tiny
    assert main(["eval", str(engine), "--num-tokens", "0"]) == 1
    assert "--num-tokens must be at least 1" in capsys.readouterr().err


def test_cli_eval_compare_and_verify_on_a_tiny_gguf(tmp_path, capsys):
    """The whole command: a tiny GGUF (with a tokenizer) built plain and int8-wo, evaluated on
    a text file, the JSON in the documented shape; verify names no layer against itself."""
    from tests.checkpoint.test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "t.gguf", hidden=64, inter=128, heads=4, kv_heads=2, layers=2)
    assert main(["build", str(tmp_path / "t.gguf"), "-o", str(tmp_path / "plain"),
                 "--dtype", "float32"]) == 0
    assert main(["build", str(tmp_path / "t.gguf"), "-o", str(tmp_path / "int8"),
                 "--dtype", "float32", "--quant", "int8-wo"]) == 0
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "hello world " * 30}) for _ in range(10)))
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "int8"), "--compare", str(tmp_path / "plain"),
                 "--dataset-path", str(text), "--num-tokens", "200", "--window", "64",
                 "--output-json", str(out), "--no-progress", "--device", "cpu"]) == 0
    payload = json.loads(out.read_text())
    assert payload["num_tokens"] == 200
    assert set(payload["compare"]) == {"perplexity", "ppl_delta_pct", "top1_agreement", "mean_kl"}
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "plain"), "--against", str(tmp_path / "plain"),
                 "--device", "cpu"]) == 0
    assert "no layer crosses the threshold" in capsys.readouterr().out


def test_cli_eval_borrows_a_tokenizer_for_an_engine_without_one(tiny, tmp_path, capsys):
    """A random-weight engine has no tokenizer: --tokenizer reads the text through another
    model's (here a tiny GGUF engine's 40 tokens, inside the tiny engine's 64); one larger
    than the model's vocabulary is refused, naming both sizes."""
    from kiln.checkpoint.tokenizer import borrowed_tokenizer
    from kiln.errors import KilnError
    from tests.checkpoint.test_gguf import write_tiny_gguf

    _, engine = tiny
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "hello world " * 30}) for _ in range(4)))
    write_tiny_gguf(tmp_path / "t.gguf", hidden=64, inter=128, heads=4, kv_heads=2, layers=1)
    lender = tmp_path / "lender"
    assert main(["build", str(tmp_path / "t.gguf"), "-o", str(lender), "--dtype", "float32"]) == 0
    out = tmp_path / "r.json"
    assert main(["eval", str(engine), "--compare", str(engine), "--tokenizer", str(lender),
                 "--dataset-path", str(text), "--num-tokens", "60", "--window", "32",
                 "--output-json", str(out), "--no-progress", "--device", "cpu"]) == 0
    payload = json.loads(out.read_text())
    assert payload["num_tokens"] == 60 and payload["compare"]["top1_agreement"] == 1.0
    capsys.readouterr()
    # kiln verify reads its prompt the same way (a random-weight engine: no tokenizer).
    assert main(["verify", str(engine), "--against", str(engine), "--device", "cpu"]) == 1
    assert "give --tokenizer MODEL" in capsys.readouterr().err
    assert main(["verify", str(engine), "--against", str(engine), "--tokenizer", str(lender),
                 "--prompt", "hello world hello", "--device", "cpu"]) == 0
    assert "no layer crosses the threshold" in capsys.readouterr().out
    with pytest.raises(KilnError, match="--tokenizer .* has 40 tokens, more than the model's 32"):
        borrowed_tokenizer(str(lender), 32)


def test_the_decode_path_gives_the_prefill_paths_logits(tiny):
    """Windows fed one token a step (a batch of them, ragged: the last window shorter, more
    windows than the batch) predict what one forward per window predicts: on the CPU both
    paths run the torch reference attention, so they differ only in summation order."""
    _, engine = tiny
    ids = _tokens(100, seed=3)
    prefill = TeacherForcedModel(engine, device="cpu", max_window=32)
    decode = TeacherForcedModel(engine, device="cpu", max_window=32, max_windows=2)
    chunks = windows(ids, 32, 90)
    assert [len(c) for c in chunks] == [32, 32, 29]  # two groups: [32, 32] and [29]
    steps = list(decode.decode_logits(chunks[:2]))
    assert len(steps) == 31 and all(step.shape == (2, 64) for step in steps)
    for index, chunk in enumerate(chunks[:2]):
        by_step = torch.stack([step[index] for step in steps])
        torch.testing.assert_close(by_step, prefill.logits(chunk)[:-1], rtol=1e-4, atol=1e-4)
    by_prefill = evaluate(prefill, ids, window=32, num_tokens=90, progress=False)
    by_decode = evaluate(decode, ids, window=32, num_tokens=90, other=prefill, progress=False,
                         path="decode")
    assert by_decode.num_tokens == by_prefill.num_tokens == 90
    assert by_decode.perplexity == pytest.approx(by_prefill.perplexity, rel=1e-5)
    assert by_decode.compare.top1_agreement == 1.0


def test_the_decode_path_refuses_what_its_cache_cannot_hold(tiny):
    from kiln.errors import KilnError

    _, engine = tiny
    model = TeacherForcedModel(engine, device="cpu", max_window=16, max_windows=2)
    with pytest.raises(KilnError, match="3 windows at once; this model holds 1..2"):
        next(model.decode_logits([[1, 2]] * 3))
    with pytest.raises(KilnError, match=r"windows of \[2, 5\] tokens: each 2..16, longest first"):
        next(model.decode_logits([[1, 2], [1, 2, 3, 4, 5]]))
    with pytest.raises(KilnError, match="max_windows must be at least 1, got 0"):
        TeacherForcedModel(engine, device="cpu", max_window=16, max_windows=0)
    with pytest.raises(KilnError, match="path 'sideways': expected one of prefill, decode"):
        evaluate(model, _tokens(20), window=16, num_tokens=10, progress=False, path="sideways")


@pytest.mark.filterwarnings("ignore:FP8 KV cache with uncalibrated scales")
def test_an_fp8_cache_is_read_in_its_engines_block_size(tiny):
    """The FP8 cache's decode kernel is laid out by its block size, so eval takes the
    engine's default for it (FP8_KV_DEFAULT_BLOCK_SIZE), and 16 otherwise; both paths then
    read the same FP8 numbers."""
    from kiln.config import FP8_KV_DEFAULT_BLOCK_SIZE

    _, engine = tiny
    plain = TeacherForcedModel(engine, device="cpu", max_window=48)
    fp8 = TeacherForcedModel(engine, device="cpu", max_window=48, kv_cache_dtype="fp8",
                             max_windows=2)
    assert (plain.block_size, fp8.block_size) == (16, FP8_KV_DEFAULT_BLOCK_SIZE)
    assert fp8.kv_caches[0].shape[2] == FP8_KV_DEFAULT_BLOCK_SIZE
    ids = _tokens(100, seed=4)
    prefill = evaluate(fp8, ids, window=48, num_tokens=94, other=plain, progress=False)
    decode = evaluate(fp8, ids, window=48, num_tokens=94, other=plain, progress=False,
                      path="decode")
    assert decode.perplexity == pytest.approx(prefill.perplexity, rel=1e-4)
    # KL ~3e-7 nats here (a tiny model's near-flat logits): summation order moves it ~5 %.
    assert 0 < decode.compare.mean_kl == pytest.approx(prefill.compare.mean_kl, rel=0.2)


def test_cli_eval_decode_path(tiny, tmp_path, capsys):
    from tests.checkpoint.test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "t.gguf", hidden=64, inter=128, heads=4, kv_heads=2, layers=1)
    engine = tmp_path / "e"
    assert main(["build", str(tmp_path / "t.gguf"), "-o", str(engine), "--dtype", "float32"]) == 0
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "hello world " * 30}) for _ in range(4)))
    runs = {}
    for path in ("prefill", "decode"):
        out = tmp_path / f"{path}.json"
        assert main(["eval", str(engine), "--compare", str(engine), "--dataset-path", str(text),
                     "--num-tokens", "100", "--window", "32", "--path", path,
                     "--decode-batch", "3", "--output-json", str(out), "--no-progress",
                     "--device", "cpu"]) == 0
        runs[path] = json.loads(out.read_text())
    assert "decode path (3 at a time)" in capsys.readouterr().err
    assert runs["decode"]["num_tokens"] == runs["prefill"]["num_tokens"] == 100
    assert runs["decode"]["perplexity"] == pytest.approx(runs["prefill"]["perplexity"], rel=1e-5)
    assert main(["eval", str(engine), "--path", "decode", "--decode-batch", "0"]) == 1
    assert "--decode-batch must be at least 1, got 0" in capsys.readouterr().err
    # A batch past the text's windows (100 tokens, 31 a window: 4) allocates only those.
    assert main(["eval", str(engine), "--dataset-path", str(text), "--num-tokens", "100",
                 "--window", "32", "--path", "decode", "--decode-batch", "1000000000",
                 "--no-progress", "--device", "cpu"]) == 0
    assert "decode path (4 at a time)" in capsys.readouterr().err


def test_kl_and_agreement_by_hand():
    """Σ KL(P_reference || P) over positions and the argmax matches; a token the reference
    rules out (probability 0) costs nothing, even where the other puts mass on it."""
    reference = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    other = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.2, 0.6]])
    kl, agree = kl_and_agreement(reference.log(), other.log())
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.5)
                + 0.1 * math.log(0.1 / 0.2) + 0.2 * math.log(0.2 / 0.2) + 0.7 * math.log(0.7 / 0.6))
    assert kl == pytest.approx(expected, rel=1e-6)
    assert agree == 1  # row 0: argmax 0 against 1 (ties break to the first); row 1: both 2
    assert kl_and_agreement(reference.log(), other.log(), reference) == (kl, agree)
