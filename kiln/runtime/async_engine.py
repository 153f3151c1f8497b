"""AsyncLLMEngine: the LLMEngine loop behind asyncio, for servers.

    caller coroutines                      engine loop task (event loop thread)
    generate() ──put add──► _commands ──►  apply adds / aborts   (between steps only)
             ◄── RequestOutput deltas ◄──  await to_thread(engine.step)
    (cancelled → put abort)

Only the loop task touches the LLMEngine, and only between steps, so a step running in the
worker thread never races with an add or an abort. A caller that stops iterating (client
disconnect → task cancelled) aborts its request; its KV blocks are freed before the next
step is scheduled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import AsyncIterator

from kiln.runtime.engine import LLMEngine, PromptType
from kiln.runtime.request_output import RequestOutput
from kiln.runtime.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, llm_engine: LLMEngine) -> None:
        self.llm_engine = llm_engine
        self._commands: deque[tuple] = deque()
        self._streams: dict[str, asyncio.Queue] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._ids = 0
        self._stopping = False
        # Set when the loop died; every waiting and later caller gets it.
        self.error: BaseException | None = None

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def _ensure_loop(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine loop has stopped: {self.error!r}")
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput (with this step's deltas) each step until it finishes.
        Invalid input raises ValueError before anything is queued."""
        self._ensure_loop()
        if request_id is None:
            self._ids += 1
            request_id = f"async-{self._ids}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Validate here, in the caller, so bad input never reaches the loop.
        _, token_ids = self.llm_engine.prepare_prompt(prompt)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.append(("add", request_id, {"prompt_token_ids": token_ids}, sampling_params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        if self._wakeup is not None:
            self._wakeup.set()

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "abort":
                self.llm_engine.abort_request(command[1])
                continue
            _, request_id, prompt, params = command
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # the caller went away before its request was added
            try:
                self.llm_engine.add_request(request_id, prompt, params)
            except ValueError as error:
                stream.put_nowait(error)

    async def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.llm_engine.has_unfinished_requests():
                    self._wakeup.clear()
                    if not self._commands and not self._stopping:
                        await self._wakeup.wait()
                    continue
                outputs = await asyncio.to_thread(self.llm_engine.step)
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        stream.put_nowait(output)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # the loop is dead: tell every waiting caller why
            self.error = error
            for stream in self._streams.values():
                stream.put_nowait(RuntimeError(f"the engine loop has stopped: {error!r}"))
            raise

    async def shutdown(self) -> None:
        """Stop the loop after the step in flight (never mid-step: the worker thread would
        keep using the engine), abort what is left and tell any waiting caller."""
        if self._loop_task is None:
            return
        self._stopping = True
        self._wakeup.set()
        # The loop ends by itself once _stopping is seen; it only raises CancelledError if
        # someone else cancelled it, which is the same outcome: stopped.
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self._loop_task = None
        self.llm_engine.abort_all()
        for stream in self._streams.values():
            stream.put_nowait(RuntimeError("the engine was shut down"))
