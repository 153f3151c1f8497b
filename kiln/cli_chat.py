"""`kiln chat`: a streaming terminal chat, as `ollama run` and `llama-cli -cnv` offer.

    you> text          a turn; the answer streams back
    /system TEXT       set the system prompt (empty: none); the conversation stays
    /reset             forget the conversation (the system prompt stays)
    /params            the sampling parameters in use
    /set NAME VALUE    change one (temperature, top_p, top_k, min_p, repetition_penalty,
                       max_tokens, seed)
    /help, /exit       (Ctrl-D leaves too; Ctrl-C stops an answer, the conversation stays)

When the conversation no longer fits the context (prompt + max_tokens > max_model_len), the
oldest turns are dropped with a one-line note; a single message too long even alone is
refused and the session goes on. On a terminal, lines are read through the standard
library's readline (arrow keys, editing, history kept in the kiln cache directory).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

COMMANDS = ("/system", "/reset", "/params", "/set", "/help", "/exit")
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
            "repetition_penalty": float, "max_tokens": int, "seed": int}
HELP = ("/system TEXT set the system prompt · /reset forget the conversation · /params show "
        "the sampling parameters · /set NAME VALUE change one · /exit or Ctrl-D leave · "
        "Ctrl-C stops an answer")


@dataclasses.dataclass
class Fitted:
    """The prompt of the next answer, after fitting the conversation to the context."""

    token_ids: list[int]
    max_tokens: int
    dropped_turns: int
    clamped_to_context: bool  # max_tokens lowered to what the context leaves


class ChatSession:
    """The conversation and its settings; no terminal in here (tests drive it directly)."""

    def __init__(self, llm, params) -> None:
        self.llm = llm
        self.params = params
        self.system: str | None = None
        self.turns: list[dict] = []  # user / assistant messages, oldest first

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def fit(self) -> Fitted | str:
        """Drop the oldest turns until prompt + max_tokens fits the context; a string says
        why the last message cannot be answered at all (it is then taken back)."""
        engine = self.llm.llm_engine
        max_model_len = engine.max_model_len
        dropped = 0
        while True:
            token_ids = self.llm.chat_token_ids(self.messages())
            room = max_model_len - len(token_ids)
            wanted = self.params.max_tokens or room
            if wanted <= room:
                return Fitted(token_ids, wanted, dropped, self.params.max_tokens is None)
            if len(self.turns) > 1:
                # The oldest exchange: a user message and the answer to it.
                del self.turns[: 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1]
                dropped += 1
                continue
            if room >= 1:
                return Fitted(token_ids, room, dropped, True)
            self.turns.pop()
            return (f"that message is {len(token_ids)} tokens with the chat template; the "
                    f"context holds {max_model_len} (--max-model-len): say something shorter")

    def set_param(self, name: str, value: str) -> str:
        if name not in SETTABLE:
            return f"/set knows {', '.join(SETTABLE)}"
        try:
            parsed = None if value.lower() == "none" and name in ("seed", "max_tokens") else SETTABLE[name](value)
            self.params = dataclasses.replace(self.params, **{name: parsed})
        except ValueError as error:
            return f"/set {name}: {error}"
        return f"{name} = {getattr(self.params, name)}"

    def describe_params(self) -> str:
        p = self.params
        fields = [f"temperature {p.temperature}", f"top_p {p.top_p}", f"top_k {p.top_k}",
                  f"min_p {p.min_p}", f"repetition_penalty {p.repetition_penalty}",
                  f"max_tokens {p.max_tokens}", f"seed {p.seed}"]
        if p.stop:
            fields.append(f"stop {p.stop}")
        fields.append(f"system {self.system!r}" if self.system else "system (none)")
        return ", ".join(fields)


class _Interrupt:
    """Ctrl-C while an answer streams sets a flag (checked between engine steps) instead of
    raising inside a step, which could leave the engine half-updated."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def answer(session: ChatSession, out: TextIO, interactive: bool) -> None:
    """Stream one answer to the last user message into `out`."""
    fitted = session.fit()
    if isinstance(fitted, str):
        out.write(f"[{fitted}]\n")
        return
    if fitted.dropped_turns:
        turns = "turn" if fitted.dropped_turns == 1 else f"{fitted.dropped_turns} turns"
        out.write(f"[dropped the oldest {turns} to fit the "
                  f"{session.llm.llm_engine.max_model_len}-token context]\n")
    engine = session.llm.llm_engine
    params = dataclasses.replace(session.params, max_tokens=fitted.max_tokens, n=1,
                                 output_kind="cumulative")
    request_id = engine.add_request(None, {"prompt_token_ids": fitted.token_ids}, params)
    out.write("kiln> ")
    out.flush()
    text, finish_reason = "", None
    with _Interrupt() as interrupt:
        while engine.has_unfinished_requests():
            if interrupt.hit and finish_reason is None:
                engine.abort_request(request_id)
                finish_reason = "abort"
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                completion = output.outputs[0]
                out.write(completion.delta_text)
                if interactive:
                    out.flush()
                text, finish_reason = completion.text, completion.finish_reason
    out.write("\n")
    if finish_reason == "abort":
        out.write("[stopped]\n")
    elif finish_reason == "length":
        if fitted.clamped_to_context:
            out.write(f"[cut at the end of the {engine.max_model_len}-token context]\n")
        else:
            out.write(f"[cut at max_tokens {fitted.max_tokens}: /set max_tokens N for more]\n")
    out.flush()
    # A stopped answer stays in the conversation as far as it got, as in ollama.
    session.turns.append({"role": "assistant", "content": text})


def banner(session: ChatSession, model_name: str) -> str:
    engine = session.llm.llm_engine
    return (f"kiln chat · {model_name} ({engine.model_config.architecture}) · context "
            f"{engine.max_model_len} tokens\n"
            f"Type a message. /help for commands; /exit or Ctrl-D to leave, Ctrl-C stops an answer.\n")


def handle_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; False when it asks to leave."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/reset":
        session.turns.clear()
        out.write("[conversation cleared]\n")
    elif name == "/system":
        session.system = rest or None
        out.write(f"[system prompt set: {rest}]\n" if rest else "[system prompt cleared]\n")
    elif name == "/params":
        out.write(session.describe_params() + "\n")
    elif name == "/set":
        setting, _, value = rest.partition(" ")
        out.write(session.set_param(setting, value.strip()) + "\n")
    elif name in ("/help", "/?"):
        out.write(HELP + "\n")
    else:
        out.write(f"[unknown command {name}; {HELP}]\n")
    out.flush()
    return True


def history_path() -> Path:
    base = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(base) / "chat_history"


def _setup_readline():
    """The standard library's line editing, when this Python has it."""
    try:
        import readline
    except ImportError:  # a Python built without it: plain input() still works
        return None
    try:
        readline.read_history_file(history_path())
    except OSError:  # no history yet, or unreadable: start the session without it
        pass
    readline.set_history_length(1000)

    def complete(text: str, state: int):
        matches = [c for c in COMMANDS if c.startswith(text)] if text.startswith("/") else []
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")
    return readline


def run_chat(llm, params, stdin: TextIO | None = None, stdout: TextIO | None = None,
             model_name: str = "") -> None:
    """The chat loop. Given streams (tests), lines are read from `stdin` as they come;
    otherwise a terminal gets readline editing and a pipe is read line by line."""
    terminal = stdin is None and sys.stdin.isatty()
    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(llm, params)
    if llm.tokenizer is None:
        from kiln.errors import KilnError

        raise KilnError("kiln chat needs an engine with a tokenizer (this one has none); "
                        "use kiln generate --prompt-token-ids")
    interactive = terminal or out.isatty()
    if interactive:
        out.write(banner(session, model_name))
        out.flush()
    readline = _setup_readline() if terminal else None
    try:
        while True:
            try:
                if terminal:
                    line = input("you> ")
                else:
                    out.write("you> ")
                    out.flush()
                    line = stdin.readline()
                    if not line:
                        raise EOFError
            except EOFError:
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write("\n[Ctrl-D or /exit to leave]\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not handle_command(session, line, out):
                    break
                continue
            session.turns.append({"role": "user", "content": line})
            answer(session, out, interactive)
    finally:
        out.flush()
        if readline is not None:
            try:
                history_path().parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history_path())
            except OSError:  # history is a convenience: a read-only cache must not end the chat
                pass
