"""A rank other than 0: builds its runner, then runs each step rank 0 broadcasts.

    python -m kiln.parallel.worker RANK      spawned by the engine (executor.py); the spec
                                              comes in KILN_WORKER_SPEC (JSON)
    run_torchrun_worker(spec, rank, ...)      a torchrun rank > 0 (kiln serve/generate/bench,
                                              LLM: the same command on every rank)

The loop: receive a message; STEP → decode the SchedulerOutput (msgpack, wire.py), run it;
the sampling rank (tp rank 0 of the last stage), when it is not rank 0 itself (pp > 1),
sends the encoded ModelRunnerOutput back to rank 0. SHUTDOWN → leave.

Messages are received by a thread of their own, always ready, and queued for the loop: a
gloo broadcast completes only when every rank has posted its receive, so at pp > 1 rank 0
would otherwise wait, before it can start micro-batch b + 1 on stage 0, for the last stage
to finish micro-batch b. For the same reason the results go out as pending sends, not
waited for: rank 0 may be sending this rank the next micro-batch's activations (through
the stages between) while the result of the last one is on its way back.

A spawned worker never outlives the engine: the kernel kills it when its parent dies
(PR_SET_PDEATHSIG, set before exec) and a thread checks the parent too. It ignores Ctrl-C
(the terminal sends SIGINT to the whole process group; the engine shuts its workers down in
order) and exits on SIGTERM. Any error — a peer that died or hung past the step timeout, a
bad message — is printed as one line naming the rank and the process exits non-zero.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SPEC_ENV = "KILN_WORKER_SPEC"
PARENT_ENV = "KILN_WORKER_PARENT_PID"
# Test hook for the failure tests: "RANK:hang@STEP" makes that rank sleep forever when the
# given step (1-based) arrives; "RANK:exit@STEP" makes it exit at once (code 3). Step 0:
# at start-up, before the rank joins the world; "joined": once it has joined, before loading.
FAULT_ENV = "KILN_TEST_WORKER_FAULT"
JOINED = -1  # the step number "joined" stands for


def serve_steps(world, runner) -> None:
    """The worker loop, until SHUTDOWN."""
    from collections import deque

    from kiln.parallel.launch import SHUTDOWN, STEP, send_bytes
    from kiln.runtime import wire

    parallel = world.parallel
    sends_results = parallel.is_driver and parallel.rank != 0
    fault = _fault_for(parallel.rank)
    messages = _MessageReceiver(world.control_group)
    # Result sends still pending, oldest first. Rank 0 keeps at most pp steps in flight, so
    # by the time a step's result is sent, every one pp steps older has been received.
    pending: deque[list] = deque()
    steps = 0
    while True:
        kind, payload = messages.next()
        if kind == SHUTDOWN:
            break
        if kind != STEP:
            raise RuntimeError(f"unknown control message kind {kind}")
        steps += 1
        if fault is not None and steps == fault[1]:
            _inject(fault[0])
        output = runner.execute(wire.decode(payload))
        if sends_results:
            while len(pending) >= parallel.pp_size:
                _wait_all(pending.popleft())
            pending.append(send_bytes(wire.encode(output), 0, world.result_group))
    while pending:  # rank 0 collected every step before SHUTDOWN: these are done
        _wait_all(pending.popleft())
    # The receiver returned after SHUTDOWN. (After an error the process exits, and the
    # daemon thread, blocked in a receive, with it: nothing to wait for.)
    messages.join()


class _MessageReceiver:
    """Receives rank 0's control messages on a thread of its own and queues them, so rank 0's
    broadcasts never wait for this rank's step to end. An error there (rank 0 gone) is
    raised by next()."""

    def __init__(self, control_group) -> None:
        import queue

        self._group = control_group
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._receive, name="kiln-control-receiver",
                                        daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        from kiln.parallel.launch import STEP, receive_message

        while True:
            try:
                kind, payload = receive_message(self._group)
            except BaseException as error:  # noqa: BLE001 - handed to the loop to raise
                self._queue.put(error)
                return
            self._queue.put((kind, payload))
            if kind != STEP:  # SHUTDOWN (or garbage the loop refuses): nothing follows
                return

    def next(self) -> tuple[int, bytes]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def join(self) -> None:
        self._thread.join()


def _wait_all(works: list) -> None:
    for work in works:
        work.wait()


def run_worker(spec, rank: int, local_rank: int) -> None:
    from kiln.parallel.launch import device_for, join_world, make_runner
    from kiln.runtime import collector

    fault = _fault_for(rank)
    if fault is not None and fault[1] == 0:
        _inject(fault[0])
    world = join_world(spec, rank)
    if fault is not None and fault[1] == JOINED:
        _inject(fault[0])
    runner = None
    try:
        device = device_for(spec, local_rank)
        runner = make_runner(spec, world, device)
        if device.type == "cuda":  # as rank 0's engine (LLMEngine.from_engine_dir)
            collector.tune_for_engine()
        serve_steps(world, runner)
    finally:
        if runner is not None:
            runner.close()
        world.parallel.close()


def _run_or_exit(spec, rank: int, local_rank: int, *, catch: type[BaseException]) -> None:
    """The worker loop; a failure is one line on stderr and exit status 1, no traceback."""
    try:
        run_worker(spec, rank, local_rank)
    except catch as error:  # noqa: BLE001 - one line, then a non-zero exit
        print(f"kiln worker rank {rank}: {_describe(error)}", file=sys.stderr, flush=True)
        os._exit(1)


def run_torchrun_worker(spec, rank: int, local_rank: int) -> None:
    """A torchrun rank > 0: the worker loop, then exit (the process has nothing else to do)."""
    _run_or_exit(spec, rank, local_rank, catch=Exception)
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    from kiln.parallel.launch import WorkerSpec

    argv = sys.argv[1:] if argv is None else argv
    rank = int(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    _exit_with_parent()
    spec = WorkerSpec.from_json(os.environ[SPEC_ENV])
    _run_or_exit(spec, rank, rank, catch=BaseException)
    os._exit(0)


def set_parent_death_signal() -> None:
    """Linux: SIGKILL this process when its parent dies (a preexec_fn: runs in the child)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the watcher thread below still ends the worker


def _exit_with_parent() -> None:
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return

    def watch() -> None:
        while True:
            if os.getppid() != int(parent):
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _fault_for(rank: int) -> tuple[str, int] | None:
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    target, _, action = value.partition(":")
    kind, _, step = action.partition("@")
    if int(target) != rank:
        return None
    return kind, JOINED if step == "joined" else int(step)


def _inject(kind: str) -> None:
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "exit":
        os._exit(3)
    raise RuntimeError(f"unknown test fault {kind!r}")


if __name__ == "__main__":
    main()
