"""Rank 0's side of a tensor/pipeline-parallel engine: the engine's runner when tp × pp > 1.

`ParallelExecutor` stands where the ModelRunner stands at tp 1 (execute_async / collect /
close and the runner's figures), so the scheduler and the engine loop do not change:

    execute_async(out)   broadcast `out` as msgpack bytes to every rank (launch.py), then run
                         it on rank 0's own ModelRunner (rank 0 holds tp rank 0 of stage 0)
    collect(launched)    rank 0's own output when it samples (pp 1); else the sampling rank's
                         (tp rank 0 of the last stage) bytes, received and decoded

Several steps may be in flight; they are collected in the order they were launched:

    pp 1, tp > 1   overlap scheduling (`supports_overlap`): the engine launches step N + 1
                   before collecting step N, its placeholders filled on every tp rank from
                   the sampled ids the sampling rank broadcasts (ModelRunner.share_sampled_ids)
    pp > 1         micro-batches (`max_in_flight` = pp): the engine keeps up to pp steps of
                   disjoint requests in flight, so stage 0 computes micro-batch b + 1 while
                   stage 1 computes b; with overlap scheduling and fewer live requests than
                   stages, chained steps whose sampled ids the last stage sends to stage 0
                   (sampled_ids.py)

Failure: rank 0 never blocks blindly. Its control operations are polled, checking its
children; its model collectives time out after the step timeout (launch.py). A dead or hung
rank makes the step raise a KilnError naming it within that time, and the executor is then
broken: close() (the engine's) kills every worker left, so nothing outlives the engine.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.parallel import launch
from kiln.parallel.launch import WorkerSpec
from kiln.runtime import wire
from kiln.runtime.messages import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("kiln.parallel")

# After SHUTDOWN, how long workers get to leave before they are terminated, then killed.
_SHUTDOWN_GRACE_S = 10.0
_TERMINATE_GRACE_S = 3.0


class WorkerFailure(KilnError):
    """A rank died or stopped answering: the engine cannot continue."""


@dataclass
class ParallelLaunchedStep:
    local: object  # rank 0's own LaunchedStep; None: nothing was run (after a failure)
    number: int = 0  # launch order: steps are collected in it


def overlaps(config, device: torch.device) -> bool:
    """Whether the engine will overlap steps (EngineConfig.overlap_scheduling; None: on CUDA)."""
    overlap = config.overlap_scheduling
    return device.type == "cuda" if overlap is None else bool(overlap)


def make_spec(engine_info, config, device: torch.device, dtype: torch.dtype,
              kv_cache_dtype: torch.dtype, max_model_len: int, *, init_method: str,
              verify_hashes: bool) -> WorkerSpec:
    layout = engine_info.layout
    return WorkerSpec(
        engine_path=str(engine_info.path), tp=layout.tp, pp=layout.pp,
        backend="nccl" if device.type == "cuda" else "gloo", init_method=init_method,
        device_type=device.type, dtype=str(dtype).removeprefix("torch."),
        kv_cache_dtype=str(kv_cache_dtype).removeprefix("torch."),
        block_size=config.block_size, num_kv_blocks=config.num_kv_blocks,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len, enable_cuda_graphs=config.enable_cuda_graphs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        cpu_kv_cache_bytes=config.cpu_kv_cache_bytes, verify_hashes=verify_hashes,
        step_timeout_s=launch.seconds_from_environment(
            launch.STEP_TIMEOUT_ENV, launch.DEFAULT_STEP_TIMEOUT_S),
        startup_timeout_s=launch.seconds_from_environment(
            launch.STARTUP_TIMEOUT_ENV, launch.DEFAULT_STARTUP_TIMEOUT_S),
        share_sampled_ids=layout.tp > 1 and layout.pp == 1 and overlaps(config, device),
    )


def check_layout(engine_info, tp: int | None, pp: int | None) -> tuple[int, int]:
    """The (tp, pp) to run: the engine's, which an explicit request must match."""
    layout = engine_info.layout
    wanted = (tp or layout.tp, pp or layout.pp)
    if wanted != (layout.tp, layout.pp):
        raise KilnError(
            f"{engine_info.path} is built for tp {layout.tp} × pp {layout.pp}, not tp "
            f"{wanted[0]} × pp {wanted[1]}: run it with --tp {layout.tp} --pp {layout.pp} "
            f"(tensor_parallel_size={layout.tp}, pipeline_parallel_size={layout.pp}) or "
            f"rebuild it with `kiln build ... --tp {wanted[0]} --pp {wanted[1]}`"
        )
    return wanted


class ParallelExecutor:
    def __init__(self, spec: WorkerSpec, engine_info, device: torch.device,
                 processes: list[subprocess.Popen], rendezvous_dir: str | None) -> None:
        self.spec = spec
        # Overlapped steps need the sampled ids on every rank that fills placeholders: the
        # tp peers get them at pp 1 (share_sampled_ids); at pp > 1 stage 0 gets those of
        # the steps the engine's micro-batch loop marks (sampled_ids.py).
        self.supports_overlap = spec.share_sampled_ids or spec.pp > 1
        self.max_in_flight = spec.pp
        self._launched = 0  # steps launched, and collected: collect() takes them in order
        self._collected = 0
        self.processes = processes  # ranks 1..W-1 when spawned; empty under torchrun
        self._rendezvous_dir = rendezvous_dir
        self._broken: str | None = None
        self._closed = False
        self.runner = None
        atexit.register(self._kill_workers)
        self.world = launch.join_world(spec, 0, check_alive=self._check_alive)
        # The engine's view: the executor, not the engine, leaves the world (close()).
        self.parallel = dataclasses.replace(self.world.parallel, owns_process_group=False)
        try:
            self.runner = launch.make_runner(spec, self.world, device, engine_info=engine_info)
            launch.bound_control_timeout(self.world, spec.step_timeout_s)  # all started
        except BaseException:  # a worker died loading, say: the next engine needs a new world
            _stop(processes)  # first, as close() does: no live peer for a pending operation
            _leave_world(self.world, self.parallel)
            raise
        # The sampling rank: rank 0 itself at pp 1, tp rank 0 of the last stage otherwise.
        self._driver = self.parallel.last_stage_driver_rank

    # ---- start ------------------------------------------------------------------------

    @classmethod
    def start(cls, engine_info, config, device: torch.device, dtype: torch.dtype,
              kv_cache_dtype: torch.dtype, max_model_len: int) -> "ParallelExecutor":
        """Spawn ranks 1..W-1 on this machine (or, under torchrun, meet the ranks it
        started) and build rank 0's runner."""
        launch.apply_multicast_off()
        torchrun = launch.torchrun_rank()
        if torchrun is not None:
            spec = make_spec(engine_info, config, device, dtype, kv_cache_dtype, max_model_len,
                             init_method="env://", verify_hashes=config.verify_hashes)
            _check_world_size(spec, torchrun.world_size)
            if torchrun.rank != 0:  # this process is a worker, not an engine: it never returns
                from kiln.parallel.worker import run_torchrun_worker

                run_torchrun_worker(spec, torchrun.rank, torchrun.local_rank)
            if device.type == "cuda":
                device = launch.device_for(spec, torchrun.local_rank)
            return cls(spec, engine_info, device, [], None)
        rendezvous_dir = tempfile.mkdtemp(prefix="kiln-rendezvous-")
        # Rank 0 has just verified every file's hash; the workers read the same files.
        spec = make_spec(engine_info, config, device, dtype, kv_cache_dtype, max_model_len,
                         init_method=f"file://{rendezvous_dir}/store", verify_hashes=False)
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if count < spec.world_size:
                raise KilnError(f"tp {spec.tp} × pp {spec.pp} needs {spec.world_size} GPUs; "
                                f"this machine has {count}")
            device = launch.device_for(spec, 0)
        processes = [_spawn(spec, rank) for rank in range(1, spec.world_size)]
        try:
            return cls(spec, engine_info, device, processes, rendezvous_dir)
        except BaseException as error:
            _stop(processes)
            shutil.rmtree(rendezvous_dir, ignore_errors=True)
            dead = _describe_dead(processes)
            if dead:
                raise WorkerFailure(f"a parallel worker failed at start-up: {dead}") from None
            raise error

    # ---- the runner's interface -------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.execute_async(scheduler_output))

    def execute_async(self, scheduler_output: SchedulerOutput) -> ParallelLaunchedStep:
        if self._broken is not None and scheduler_output.is_empty:
            # Bookkeeping after a failure (aborts, close): nothing to compute, nobody to tell.
            return ParallelLaunchedStep(None)
        self._check_usable()
        deadline = time.monotonic() + self.spec.step_timeout_s
        try:
            with _interrupts_deferred():
                launch.broadcast_message(launch.STEP, wire.encode(scheduler_output),
                                         self.world.control_group, self._waiter(deadline))
                local = self.runner.execute_async(scheduler_output)
        except Exception as error:  # noqa: BLE001 - turned into one clear failure
            raise self._fail(error) from None
        self._launched += 1
        return ParallelLaunchedStep(local, self._launched)

    def collect(self, launched: ParallelLaunchedStep) -> ModelRunnerOutput:
        if launched.local is None:
            return ModelRunnerOutput(sampled_token_ids={})
        self._check_usable()
        if self._driver != 0:
            if launched.number != self._collected + 1:
                # The sampling rank's results arrive in launch order; another order would
                # hand one step's tokens to another step's requests.
                raise RuntimeError(f"step {launched.number} collected before step "
                                   f"{self._collected + 1}: collect steps in launch order")
            self._collected += 1
        try:
            with _interrupts_deferred():
                local = self.runner.collect(launched.local)
                if self._driver == 0:
                    return local
                deadline = time.monotonic() + self.spec.step_timeout_s
                payload = launch.receive_bytes(self._driver, self.world.result_group, deadline)
                return wire.decode(payload)
        except Exception as error:  # noqa: BLE001
            raise self._fail(error) from None

    def __getattr__(self, name: str):
        # The runner's figures (num_kv_blocks, kv_cache_spec, load_seconds, wait_seconds, ...)
        # are rank 0's: every rank has the same number of blocks (the smallest fit).
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    # ---- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Tell every rank to leave, wait for them (then terminate, then kill), and leave
        the world. Idempotent; after a failure it kills at once."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None:
            try:
                deadline = time.monotonic() + self.spec.step_timeout_s
                launch.broadcast_message(launch.SHUTDOWN, b"", self.world.control_group,
                                         self._waiter(deadline))
            except Exception as error:  # noqa: BLE001
                self._broken = f"shutdown: {error}"
        if self.runner is not None:
            self.runner.close()
        if self._broken is None:
            _wait_exit(self.processes, _SHUTDOWN_GRACE_S)
        _stop(self.processes)
        _leave_world(self.world, self.parallel)
        if self._rendezvous_dir:
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
        atexit.unregister(self._kill_workers)

    def _kill_workers(self) -> None:
        _stop(self.processes, grace=0.0)

    # ---- failure ----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise WorkerFailure(f"the parallel engine failed earlier ({self._broken}); close it")

    def _check_alive(self) -> None:
        dead = _describe_dead(self.processes)
        if dead:
            raise WorkerFailure(dead)

    def _waiter(self, deadline: float):
        def wait(work, what: str) -> None:
            launch.poll_until_done(work, what, deadline, self._check_alive)
        return wait

    def _fail(self, error: Exception) -> WorkerFailure:
        """The step's error as one line naming what went wrong; the executor is broken and
        its workers are stopped (nothing can step any more)."""
        time.sleep(0.2)  # a killed peer's exit status lands a moment after its sockets close
        dead = _describe_dead(self.processes)
        if dead:
            reason = dead
        elif isinstance(error, TimeoutError) or "timed out" in str(error).lower() or (
                "timeout" in str(error).lower()):
            reason = (f"a rank did not answer within {self.spec.step_timeout_s:.0f} s "
                      f"(hung or unreachable; {launch.STEP_TIMEOUT_ENV} sets the limit)")
        else:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            reason = f"{type(error).__name__}: {first}"
        self._broken = reason
        logger.error("parallel engine failed: %s", reason)
        _stop(self.processes, grace=0.0)
        return WorkerFailure(f"tensor/pipeline-parallel engine stopped: {reason}")


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C lands between the ranks' exchanges, not inside one: half a step message on
    the wire would leave the workers out of step with rank 0 (they would read the shutdown
    as the rest of the step). Only the main thread can install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def _check_world_size(spec: WorkerSpec, world_size: int) -> None:
    if world_size != spec.world_size:
        raise KilnError(
            f"torchrun started {world_size} processes; the engine is built for tp {spec.tp} × "
            f"pp {spec.pp} = {spec.world_size}"
        )


def _spawn(spec: WorkerSpec, rank: int) -> subprocess.Popen:
    from kiln.parallel.worker import PARENT_ENV, SPEC_ENV, set_parent_death_signal

    environment = launch.apply_multicast_off(dict(os.environ))
    environment[SPEC_ENV] = spec.to_json()
    environment[PARENT_ENV] = str(os.getpid())
    # The kernel's parent-death signal fires when the *thread* that forked exits, so it is
    # set only from the main thread (kiln serve loads the engine in a pool thread); the
    # worker's own watcher of its parent process covers every case.
    main_thread = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(
        [sys.executable, "-m", "kiln.parallel.worker", str(rank)],
        env=environment, stdin=subprocess.DEVNULL,
        preexec_fn=set_parent_death_signal if main_thread else None,
    )


def _describe_dead(processes: list[subprocess.Popen]) -> str:
    dead = []
    for rank, process in enumerate(processes, start=1):
        code = process.poll()
        if code is None:
            continue
        how = (f"killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        dead.append(f"worker rank {rank} (pid {process.pid}) {how}")
    return "; ".join(dead)


def _wait_exit(processes: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # still alive: killed below
            pass


def _stop(processes: list[subprocess.Popen], grace: float = _TERMINATE_GRACE_S) -> None:
    """SIGTERM every live worker, then SIGKILL what is left after `grace` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    if grace:
        _wait_exit(processes, grace)
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:  # unkillable (D state): nothing more to do from here
            pass


def _leave_world(world: launch.World, *states) -> None:
    """Destroy the world's process groups and drop this process's references to them, both
    in launch.in_leaving_thread, so the groups' destructors run there: left to the collector,
    a group with a pending operation stalled whichever thread collected next (the test
    suite's main thread once sat 15 minutes in an engine's close())."""

    def leave() -> None:
        try:
            world.parallel.close()
        finally:  # destroyed or not, this process lets go of the groups here
            world.forget_groups()
            for state in states:  # copies of world.parallel (the engine's)
                state.forget_groups()

    if not launch.in_leaving_thread(leave):
        logger.warning("a process group of the closed world is still shutting down after 5 s "
                       "(an operation waiting on a peer); it is left to a background thread")
