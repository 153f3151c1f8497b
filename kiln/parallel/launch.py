"""How the ranks of a tensor/pipeline-parallel engine find each other and talk.

Two ways to start them:

    one machine   the engine process is rank 0 and spawns ranks 1..W-1 as
                  `python -m kiln.parallel.worker` children (executor.py); they meet at a
                  FileStore rendezvous in a private temporary directory.
    several       `torchrun` starts every rank (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in
                  the environment); rank 0 runs the engine (and serves HTTP), the others
                  run the worker loop (`torchrun_rank`, worker.run_torchrun_worker).

Every rank then joins the same groups in the same order (`join_world`):

    tp groups, pp group   the model's collectives (NCCL on CUDA, gloo on the CPU), with the
                          step timeout: a dead or hung peer turns into an error in seconds
    control group         gloo over all ranks, CPU tensors, no timeout to speak of: rank 0
                          broadcasts each step message (msgpack bytes, never pickle). Workers
                          wait here while the engine is idle, so it must not time out; rank 0
                          never waits on it blindly (executor.py polls its operations and its
                          children).
    result group          gloo over all ranks, CPU tensors, the step timeout: at pp > 1 the
                          sampling rank sends each step's ModelRunnerOutput (msgpack bytes) to
                          rank 0 here (the pp group is NCCL on CUDA: no CPU tensors there)

Why a gloo broadcast of a byte tensor rather than a pipe or socket of our own: it runs over
the rendezvous torchrun already made (no extra port, the same code for one machine and for
several), never touches the GPU stream, and gloo reports a peer that closed its connection
as an error at once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch

from kiln.parallel.state import ParallelState

# NVLink multicast (NVLS) stays off on every rank: the lent machines forbid it.
MULTICAST_OFF_ENVIRONMENT = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# How long a model collective (or a step's answer) may wait for a peer before the step fails.
STEP_TIMEOUT_ENV = "KILN_PARALLEL_STEP_TIMEOUT_S"
DEFAULT_STEP_TIMEOUT_S = 20.0
# How long rank 0 waits for the others to start, load and size their caches.
STARTUP_TIMEOUT_ENV = "KILN_PARALLEL_STARTUP_TIMEOUT_S"
DEFAULT_STARTUP_TIMEOUT_S = 600.0
# The control group's timeout: idle workers wait in it as long as the engine lives.
_IDLE_TIMEOUT = timedelta(days=30)

# Control message kinds (the first of the two int64 header values; the second is the length).
STEP, SHUTDOWN = 1, 2


def apply_multicast_off(environment: dict | None = None) -> dict:
    """Set the multicast-off variables (keeping values a user set) in `environment`
    (default os.environ); returns it."""
    environment = os.environ if environment is None else environment
    for name, value in MULTICAST_OFF_ENVIRONMENT.items():
        environment.setdefault(name, value)
    return environment


def seconds_from_environment(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{name}={value!r} must be positive")
    return seconds


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build its runner: plain JSON, the same on every rank."""

    engine_path: str
    tp: int
    pp: int
    backend: str  # "nccl" or "gloo"
    init_method: str  # "file://..." (spawned) or "env://" (torchrun)
    device_type: str  # "cuda" or "cpu"
    dtype: str  # the compute dtype's torch name: "float32", "bfloat16", ...
    kv_cache_dtype: str
    block_size: int
    num_kv_blocks: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_cuda_graphs: bool
    gpu_memory_utilization: float
    cpu_kv_cache_bytes: int
    verify_hashes: bool
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    # tp > 1 at pp 1 with overlap scheduling: the sampling rank broadcasts its sampled ids
    # to its tp peers (ModelRunner.share_sampled_ids).
    share_sampled_ids: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        return cls(**json.loads(text))


@dataclass
class World:
    """One rank's membership: its model slice's state and the control group."""

    parallel: ParallelState
    control_group: object
    result_group: object = None

    @property
    def rank(self) -> int:
        return self.parallel.rank

    def forget_groups(self) -> None:
        """After the world is left: drop this rank's references to every group of it."""
        self.control_group = None
        self.result_group = None
        self.parallel.forget_groups()


def bound_control_timeout(world: World, seconds: float) -> None:
    """Rank 0, once every rank has started: its control-group operations (a step's
    broadcast, which completes once the idle workers have posted their receives) get the
    step timeout instead of the workers' idle one (30 days). Gloo destroys a group only after
    its pending operations end, so an operation left behind by a failed step must not be
    able to wait for weeks (executor._leave_world)."""
    group, timeout = world.control_group, timedelta(seconds=seconds)
    if hasattr(group, "set_timeout"):  # ProcessGroup.set_timeout: the CI's torch 2.13 has it
        group.set_timeout(timeout)
    else:  # an older torch (the device machine's 2.11 is unchecked): the gloo backend's own
        group._get_backend(torch.device("cpu"))._set_default_timeout(timeout)


def join_world(spec: WorkerSpec, rank: int, check_alive=None) -> World:
    """Join the world as `rank` (every rank calls this, in the same order of groups).
    `check_alive()` (rank 0 of a spawned world) raises when a worker has died: it is polled
    while rank 0 waits for the others to arrive."""
    import torch.distributed as dist

    started_here = not dist.is_initialized()
    if started_here:
        store = _spawned_world_store(spec, rank, check_alive)
        where = {"store": store} if store is not None else {"init_method": spec.init_method}
        dist.init_process_group(
            spec.backend, rank=rank, world_size=spec.world_size,
            timeout=timedelta(seconds=spec.startup_timeout_s), **where,
        )
    try:
        parallel = ParallelState.initialize(
            spec.tp, spec.pp, rank, backend=spec.backend, init_method=spec.init_method,
            timeout=timedelta(seconds=spec.step_timeout_s),
        )
        # initialize() saw an initialised world and so does not own it; this state does.
        parallel = _owning(parallel)
        control = dist.new_group(list(range(spec.world_size)), backend="gloo",
                                 timeout=_IDLE_TIMEOUT)
        results = dist.new_group(list(range(spec.world_size)), backend="gloo",
                                 timeout=timedelta(seconds=spec.step_timeout_s))
    except BaseException:
        if started_here:  # a world joined halfway is left: the next start makes its own
            in_leaving_thread(dist.destroy_process_group)
        raise
    return World(parallel, control, results)


def in_leaving_thread(leave) -> bool:
    """Run `leave` (what destroys process groups) in a daemon thread, waited for 5 s; True
    when it finished. A gloo group is destroyed only once its pending operations end (its
    destructor waits for its worker threads), so no caller waits on a peer that never
    answers: after 5 s the thread is left behind and the caller goes on."""
    import threading

    thread = threading.Thread(target=leave, name="kiln-leave-world", daemon=True)
    thread.start()
    thread.join(5.0)
    return not thread.is_alive()


def _spawned_world_store(spec: WorkerSpec, rank: int, check_alive):
    """The FileStore of a world rank 0 spawned (None under torchrun's env://), once every
    worker has marked it is about to join. Rank 0 polls for those marks and its children in
    Python: inside init_process_group it would wait blind, the whole start-up timeout, for a
    worker that died before arriving (seen once as a ten-minute stall of the test suite)."""
    if not spec.init_method.startswith("file://"):
        return None
    import torch.distributed as dist

    store = dist.FileStore(spec.init_method.removeprefix("file://"), spec.world_size)
    if rank != 0:
        store.set(f"kiln-arriving/{rank}", "1")
        return store
    marks = [f"kiln-arriving/{other}" for other in range(1, spec.world_size)]
    deadline = time.monotonic() + spec.startup_timeout_s
    while not store.check(marks):
        if check_alive is not None:
            check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other ranks did not start within {spec.startup_timeout_s:.0f}"
                               f" s ({STARTUP_TIMEOUT_ENV} sets the limit)")
        time.sleep(0.02)
    return store


def _owning(parallel: ParallelState) -> ParallelState:
    import dataclasses

    return dataclasses.replace(parallel, owns_process_group=True)


def device_for(spec: WorkerSpec, local_rank: int) -> torch.device:
    if spec.device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    # CPU ranks share the machine's cores: one rank's intra-op threads must not starve the
    # others at every collective.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    return torch.device("cpu")


def make_runner(spec: WorkerSpec, world: World, device: torch.device, engine_info=None):
    """This rank's ModelRunner, its KV cache sized to what every rank fits."""
    from kiln.compiler.manifest import open_engine
    from kiln.runtime.model_runner import ModelRunner

    engine_info = engine_info or open_engine(spec.engine_path, verify_hashes=spec.verify_hashes)
    return ModelRunner(
        engine_info, device, getattr(torch, spec.dtype), spec.block_size, spec.num_kv_blocks,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=spec.max_model_len,
        # Pipeline stages pass activations eagerly (no graphs for a received input yet).
        enable_cuda_graphs=spec.enable_cuda_graphs and spec.pp == 1,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        cpu_kv_cache_bytes=spec.cpu_kv_cache_bytes,
        kv_cache_dtype=getattr(torch, spec.kv_cache_dtype),
        parallel=world.parallel,
        agree_num_kv_blocks=lambda blocks: agree_min(blocks, world.control_group),
        share_sampled_ids=spec.share_sampled_ids,
    )


# ---- control messages ---------------------------------------------------------------------


def agree_min(value: int, group, wait=None) -> int:
    """The smallest of every rank's `value` (the KV cache every rank fits)."""
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group, async_op=True)
    (wait or _wait_forever)(work, "agreeing on the KV cache size")
    return int(tensor.item())


def broadcast_message(kind: int, payload: bytes, group, wait) -> None:
    """Rank 0: send (kind, payload) to every rank. `wait(work, what)` waits for each op."""
    import torch.distributed as dist

    header = torch.tensor([kind, len(payload)], dtype=torch.int64)
    wait(dist.broadcast(header, 0, group=group, async_op=True), "sending a step")
    if payload:
        body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        wait(dist.broadcast(body, 0, group=group, async_op=True), "sending a step")


def receive_message(group) -> tuple[int, bytes]:
    """Workers: the next (kind, payload) rank 0 broadcasts (blocks while the engine idles)."""
    import torch.distributed as dist

    header = torch.empty(2, dtype=torch.int64)
    dist.broadcast(header, 0, group=group)
    kind, size = (int(v) for v in header.tolist())
    if not size:
        return kind, b""
    body = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(body, 0, group=group)
    return kind, body.numpy().tobytes()


def send_bytes(payload: bytes, destination: int, group) -> list:
    """Start sending `payload` (its length, then its bytes) and return the pending sends
    (wait() each; keep them, and so their tensors, alive until then). Gloo's send completes
    only once the receiver has posted its receive, so the sampling rank does not wait here:
    rank 0 may be busy sending it the next micro-batch's activations."""
    import torch.distributed as dist

    pending = [dist.isend(torch.tensor([len(payload)], dtype=torch.int64), destination,
                          group=group)]
    if payload:
        pending.append(dist.isend(torch.frombuffer(bytearray(payload), dtype=torch.uint8),
                                  destination, group=group))
    return pending


def receive_bytes(source: int, group, deadline: float) -> bytes:
    """Rank 0: the bytes `source` sends, or TimeoutError at `deadline` (time.monotonic()).
    Gloo's point-to-point operations complete only inside wait(), so this one cannot be
    polled; a peer that dies closes its connection and fails the wait at once."""
    import torch.distributed as dist

    def wait(work) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not work.wait(timedelta(seconds=remaining)):
            raise TimeoutError("no answer from the other ranks while waiting for the sampled tokens")

    size = torch.empty(1, dtype=torch.int64)
    wait(dist.irecv(size, source, group=group))
    if not int(size.item()):
        return b""
    body = torch.empty(int(size.item()), dtype=torch.uint8)
    wait(dist.irecv(body, source, group=group))
    return body.numpy().tobytes()


def _wait_forever(work, what: str) -> None:
    work.wait()


def poll_until_done(work, what: str, deadline: float, check_alive) -> None:
    """Wait for an async op, checking `check_alive()` (raises for a dead peer) while it runs
    and raising TimeoutError at `deadline` (time.monotonic())."""
    pause = 0.0
    while not work.is_completed():
        check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from the other ranks while {what}")
        time.sleep(pause)
        pause = min(0.01, pause + 0.0005)
    work.wait()  # raises the op's own error, if it failed


# ---- torchrun -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchrunRank:
    rank: int
    world_size: int
    local_rank: int


def torchrun_rank() -> TorchrunRank | None:
    """This process's place when torchrun (or another launcher setting RANK, WORLD_SIZE and
    MASTER_ADDR) started it; None otherwise."""
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
    if not all(name in os.environ for name in names):
        return None
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return None
    return TorchrunRank(rank, world_size, local_rank) if world_size > 1 else None
