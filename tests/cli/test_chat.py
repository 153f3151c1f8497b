"""`kiln chat` as a user runs it, on a pseudo-terminal: the banner, /commands, readline
editing and history, Ctrl-C stopping an answer while the conversation goes on, Ctrl-D
leaving cleanly; and a conversation that outgrows the context dropping its oldest turns
instead of ending (the issue's own command, piped)."""

from __future__ import annotations

import io

import pexpect

from kiln.cli_chat import ChatSession, run_chat
from kiln.runtime.sampling_params import SamplingParams
from tests.cli.conftest import run_kiln, spawn_kiln

PROMPT = "you> "
LEFT, UP = "\x1b[D", "\x1b[A"


def test_chat_on_a_terminal(smollm2_engine, cli_cache_dir):
    child = spawn_kiln(["chat", str(smollm2_engine), "--device", "cpu", "--max-model-len", "512",
                        "--max-tokens", "24"], cli_cache_dir)
    transcript = io.StringIO()
    child.logfile_read = transcript
    try:
        child.expect("kiln chat · ")
        child.expect(r"context 512 tokens")
        child.expect("/exit or Ctrl-D to leave")
        child.expect_exact(PROMPT)

        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect_exact(PROMPT)

        child.sendline("/params")
        child.expect(r"temperature 0\.0, .*max_tokens 24")
        child.expect_exact(PROMPT)
        child.sendline("/set max_tokens 400")
        child.expect_exact("max_tokens = 400")
        child.expect_exact(PROMPT)

        # Line editing through readline: a step left, a backspace, an insert; the up arrow
        # then recalls the edited line.
        child.send("/system Be brisf" + LEFT + "\x7f" + "e" + "\r")
        child.expect_exact("[system prompt set: Be brief]")  # 's' → 'e' fixed in place
        child.expect_exact(PROMPT)
        child.send(UP + "\r")
        child.expect_exact("[system prompt set: Be brief]")
        child.expect_exact(PROMPT)

        # Ctrl-C while an answer streams: it stops, the session stays.
        child.sendline("Write a very long story about a dragon who bakes bread.")
        child.expect_exact("kiln> ")
        child.expect(r"\w+ \w+ \w+")  # a few words have streamed
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(PROMPT)
        child.sendline("/params")
        child.expect("system 'Be brief'")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect_exact("[conversation cleared]")
        child.expect_exact(PROMPT)
        child.sendline("/nonsense")
        child.expect_exact("[unknown command /nonsense;")
        child.expect_exact(PROMPT)

        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript.getvalue()
    assert "Traceback" not in transcript.getvalue()


def test_ctrl_c_at_the_prompt_and_exit(smollm2_engine, cli_cache_dir):
    child = spawn_kiln(["chat", str(smollm2_engine), "--device", "cpu", "--max-model-len", "256"],
                       cli_cache_dir)
    try:
        child.expect_exact(PROMPT)
        child.sendintr()
        child.expect_exact("[Ctrl-D or /exit to leave]")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_history_outgrowing_the_context_drops_the_oldest_turns(smollm2_engine, cli_cache_dir):
    """The issue's reproduction: this ended with rc 1 and the conversation lost."""
    result = run_kiln(["chat", str(smollm2_engine), "--device", "cpu", "--max-model-len", "96",
                       "--max-tokens", "32"], cli_cache_dir, input="Tell me about cats.\nAnd dogs?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("kiln> ") == 2
    assert "[dropped the oldest turn to fit the 96-token context]" in result.stdout
    assert "error" not in result.stderr


class _FakeLLM:
    """Just enough of LLM for ChatSession.fit: a 'template' of one token per character."""

    class llm_engine:  # noqa: N801 (mirrors the attribute's name)
        max_model_len = 40

    def chat_token_ids(self, messages):
        return [1] * sum(len(m["content"]) + 2 for m in messages)


def test_fit_drops_oldest_exchanges_then_refuses_a_message_too_long_alone():
    session = ChatSession(_FakeLLM(), SamplingParams(max_tokens=10))
    session.turns = [{"role": "user", "content": "a" * 8}, {"role": "assistant", "content": "b" * 8},
                     {"role": "user", "content": "c" * 8}]
    fitted = session.fit()
    assert fitted.dropped_turns == 0 and fitted.max_tokens == 10
    session.turns += [{"role": "assistant", "content": "d" * 8}, {"role": "user", "content": "e" * 8}]
    fitted = session.fit()  # 50 + 10 > 40: the oldest exchange goes
    assert fitted.dropped_turns == 1 and [t["content"][0] for t in session.turns] == ["c", "d", "e"]
    session.turns = [{"role": "user", "content": "x" * 35}]
    fitted = session.fit()  # alone it leaves 3 tokens: answer within them, and say so
    assert fitted.max_tokens == 3 and fitted.clamped_to_context
    session.turns = [{"role": "user", "content": "x" * 60}]
    refusal = session.fit()
    assert isinstance(refusal, str) and "say something shorter" in refusal
    assert session.turns == []  # taken back: the session goes on


def test_set_refuses_bad_values_with_a_line():
    session = ChatSession(_FakeLLM(), SamplingParams())
    assert session.set_param("temperature", "-1") == "/set temperature: temperature must be >= 0, got -1.0"
    assert session.set_param("colour", "red").startswith("/set knows temperature")
    assert session.set_param("seed", "none") == "seed = None"


def test_no_tokenizer_is_one_line(tiny_engine):
    from kiln.entrypoints import LLM
    from kiln.errors import KilnError

    llm = LLM(tiny_engine, device="cpu")
    try:
        run_chat(llm, SamplingParams(), stdin=io.StringIO("hi\n"), stdout=io.StringIO())
    except KilnError as error:
        assert "--prompt-token-ids" in str(error)
    else:
        raise AssertionError("a chat on an engine without a tokenizer must be refused")


def test_ctrl_c_keeps_the_conversation(smollm2_engine, shared_llms, monkeypatch):
    """In-process, with Ctrl-C simulated after a few engine steps: the answer stops where it
    got to, stays in the conversation, the engine is idle, and the next turn is answered."""
    from kiln import cli_chat
    from kiln.entrypoints import LLM

    class CtrlCAfterFourSteps(cli_chat._Interrupt):
        checks = 0

        @property
        def hit(self) -> bool:
            CtrlCAfterFourSteps.checks += 1
            return CtrlCAfterFourSteps.checks > 4

        @hit.setter
        def hit(self, value) -> None:  # the real handler's writes: this test decides instead
            pass

    llm = LLM(smollm2_engine, device="cpu", max_model_len=512)
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=200))
    session.turns.append({"role": "user", "content": "Write a long story about a dragon."})
    real_interrupt = cli_chat._Interrupt
    monkeypatch.setattr(cli_chat, "_Interrupt", CtrlCAfterFourSteps)
    out = io.StringIO()
    cli_chat.answer(session, out, interactive=False)
    assert "[stopped]" in out.getvalue()
    assert not llm.llm_engine.has_unfinished_requests()
    stopped = session.turns[-1]
    assert stopped["role"] == "assistant" and 0 < len(stopped["content"]) < 100
    monkeypatch.setattr(cli_chat, "_Interrupt", real_interrupt)
    session.turns.append({"role": "user", "content": "What is the capital of France?"})
    out = io.StringIO()
    cli_chat.answer(session, out, interactive=False)
    assert "Paris" in out.getvalue() and "[stopped]" not in out.getvalue()
    assert [t["role"] for t in session.turns] == ["user", "assistant", "user", "assistant"]
