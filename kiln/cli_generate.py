"""`kiln generate`: prompts in (flags, stdin, token ids), answers out, streamed.

Every prompt (and each of its --n samples) is queued at once, so the engine batches them; the
answers are printed in order, the one at the head streaming token by token while the rest
are buffered until their turn. With more than one answer, each starts with a header line
(`--- prompt 2/3 ---`, `--- prompt 1/1, sample 2/4 ---`) so a reader or a script can split
them. An answer cut short is followed by a one-line note on stderr saying what cut it: the
--max-tokens budget or the end of the context.

On a terminal every piece is flushed as it arrives; into a pipe the output is the same text
(no colours, no cursor tricks), written in the usual buffered way.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import TextIO

from kiln.errors import KilnError


@dataclass
class Prompt:
    """One prompt as the engine takes it, with the label its header shows."""

    engine_prompt: str | dict
    label: str


@dataclass
class Answer:
    """One sample of one prompt, as it streams."""

    request_id: str
    index: int  # which of the request's n samples
    header: str | None
    max_tokens: int  # after clamping to the context
    clamped_to_context: bool  # --max-tokens did not fit: the context ends the answer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    printed_chars: int = 0
    printed_tokens: int = 0
    header_printed: bool = False


def parse_token_ids(text: str) -> list[int]:
    """'1,2,3' or '1 2 3' → [1, 2, 3]; KilnError naming the flag otherwise."""
    pieces = text.replace(",", " ").split()
    try:
        token_ids = [int(piece) for piece in pieces]
    except ValueError:
        raise KilnError(f"--prompt-token-ids {text!r}: expected integers separated by commas "
                        f"or spaces, e.g. --prompt-token-ids 1,504,3575") from None
    if not token_ids:
        raise KilnError("--prompt-token-ids is empty: give at least one token id")
    return token_ids


def collect_prompts(args: argparse.Namespace, stdin: TextIO) -> list[Prompt]:
    """Prompts from --prompt (repeatable, '-' = all of stdin), --prompt-token-ids, or, with
    neither, stdin when it is a pipe (one prompt, or one per line with --each-line)."""
    texts: list[str] = []
    for text in args.prompt or []:
        if text == "-":
            texts.extend(_stdin_prompts(stdin, args.each_line))
        else:
            texts.append(text)
    token_id_prompts = [parse_token_ids(text) for text in args.prompt_token_ids or []]
    if not texts and not token_id_prompts:
        if stdin.isatty():
            raise KilnError("no prompt: pass --prompt TEXT (repeatable), --prompt - to read "
                            "stdin, --prompt-token-ids IDS, or pipe the prompt in")
        texts = _stdin_prompts(stdin, args.each_line)
        if not texts:
            raise KilnError("no prompt: stdin was empty")
    chat = args.chat or args.system is not None
    prompts = []
    for text in texts:
        if chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": text})
            prompts.append(Prompt(messages, _label(text)))
        else:
            prompts.append(Prompt(text, _label(text)))
    for token_ids in token_id_prompts:
        if chat:
            raise KilnError("--chat and --system need text prompts, not --prompt-token-ids")
        prompts.append(Prompt({"prompt_token_ids": token_ids},
                              _label(",".join(map(str, token_ids)))))
    return prompts


def _stdin_prompts(stdin: TextIO, each_line: bool) -> list[str]:
    text = stdin.read()
    if each_line:
        return [line.strip() for line in text.splitlines() if line.strip()]
    text = text.strip("\n")
    return [text] if text.strip() else []


def _label(text: str, width: int = 60) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def sampling_params(args: argparse.Namespace):
    """The SamplingParams of the flags (validated there: a bad value is a ValueError that
    names the field, printed as one line by kiln.cli.main)."""
    from kiln.runtime.sampling_params import SamplingParams

    return SamplingParams(
        n=getattr(args, "n", 1), temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens, seed=args.seed, stop=getattr(args, "stop", None) or None,
    )


def run_generate(llm, prompts: list[Prompt], params, stdout: TextIO, stderr: TextIO) -> int:
    """Queue every prompt, stream the answers in order; returns how many answers were cut
    short (by --max-tokens or the context)."""
    engine = llm.llm_engine
    token_ids_only = engine.tokenizer is None
    if token_ids_only and any(not isinstance(p.engine_prompt, dict) for p in prompts):
        raise KilnError("this engine has no tokenizer (a --random-weights build?): give the "
                        "prompt as token ids, e.g. --prompt-token-ids 1,504,3575")
    prepared = []
    for number, prompt in enumerate(prompts, 1):
        engine_prompt = prompt.engine_prompt
        if isinstance(engine_prompt, list):  # a chat conversation
            engine_prompt = {"prompt_token_ids": llm.chat_token_ids(engine_prompt)}
        try:
            _, token_ids = engine.prepare_prompt(engine_prompt)
        except ValueError as error:
            raise ValueError(f"prompt {number}: {error}") from None
        prepared.append(token_ids)
    answers: list[Answer] = []
    request_ids: list[str] = []
    many = len(prompts) > 1 or params.n > 1
    try:
        for number, (prompt, token_ids) in enumerate(zip(prompts, prepared), 1):
            room = engine.max_model_len - len(token_ids)
            if room < 1:
                raise ValueError(
                    f"prompt {number} has {len(token_ids)} tokens: it fills the whole "
                    f"context (max_model_len {engine.max_model_len}); shorten it or pass a "
                    f"larger --max-model-len")
            clamped = params.max_tokens is None or params.max_tokens > room
            request_params = dataclasses.replace(params, max_tokens=room) if clamped else params
            request_id = engine.add_request(None, {"prompt_token_ids": token_ids}, request_params)
            request_ids.append(request_id)
            for index in range(params.n):
                header = None
                if many:
                    header = f"--- prompt {number}/{len(prompts)}"
                    if params.n > 1:
                        header += f", sample {index + 1}/{params.n}"
                    header += f": {prompt.label} ---"
                answers.append(Answer(request_id, index, header, request_params.max_tokens, clamped))
    except BaseException:
        for request_id in request_ids:
            engine.abort_request(request_id)
        raise
    by_key = {(a.request_id, a.index): a for a in answers}
    interactive = stdout.isatty()
    head = 0
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                for completion in output.outputs:
                    answer = by_key[(output.request_id, completion.index)]
                    answer.text = completion.text
                    answer.token_ids = completion.token_ids
                    answer.finish_reason = completion.finish_reason
            head = _print_ready(answers, head, token_ids_only, stdout, stderr, interactive)
    except KeyboardInterrupt:
        for request_id in request_ids:
            engine.abort_request(request_id)
        stdout.write("\n")
        stdout.flush()
        raise
    _print_ready(answers, head, token_ids_only, stdout, stderr, interactive)
    return sum(1 for a in answers if a.finish_reason == "length")


def _print_ready(answers: list[Answer], head: int, token_ids_only: bool, stdout: TextIO,
                 stderr: TextIO, interactive: bool) -> int:
    """Print what is new of the head answer, and of the ones after it once it is done;
    returns the new head."""
    while head < len(answers):
        answer = answers[head]
        if answer.header and not answer.header_printed:
            stdout.write(answer.header + "\n")
            answer.header_printed = True
        if token_ids_only:
            new_ids = answer.token_ids[answer.printed_tokens:]
            if new_ids:
                stdout.write(("" if answer.printed_tokens == 0 else " ") + " ".join(map(str, new_ids)))
                answer.printed_tokens = len(answer.token_ids)
        else:
            stdout.write(answer.text[answer.printed_chars:])
            answer.printed_chars = len(answer.text)
        if answer.finish_reason is None:
            if interactive:
                stdout.flush()
            return head
        stdout.write("\n")
        stdout.flush()
        if answer.finish_reason == "length":
            stderr.write(f"kiln: {cut_note(answer)}\n")
            stderr.flush()
        head += 1
    return head


def cut_note(answer: Answer) -> str:
    if answer.clamped_to_context:
        return (f"answer cut at the end of the context after {len(answer.token_ids)} tokens "
                f"(--max-model-len; a shorter prompt leaves more room)")
    return f"answer cut at --max-tokens {answer.max_tokens} (raise it for a longer answer)"
