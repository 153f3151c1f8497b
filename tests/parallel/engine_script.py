"""A parallel engine generating for a long time, for the failure tests (test_parallel_failures.py):

    python engine_script.py ENGINE_DIR [overlap]
                                           prints "WORKERS <pid>...", then "STEPPING" once it
                                           has taken a step; exits 1 with "error: ..." on a
                                           KilnError, 130 with "interrupted" on Ctrl-C.
                                           The engine's own layout (tp 2, or pp 2: micro-
                                           batches); `overlap`: overlap scheduling on.
"""

import sys

from kiln.config import EngineConfig
from kiln.errors import KilnError
from kiln.compiler.manifest import open_engine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams


def main() -> int:
    engine_dir = sys.argv[1]
    config = EngineConfig(device="cpu", block_size=4,
                          overlap_scheduling=sys.argv[2:] == ["overlap"])
    try:
        with LLMEngine(open_engine(engine_dir), config) as engine:
            print("WORKERS", *(p.pid for p in engine.runner.processes), flush=True)
            params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            for index in range(4):
                engine.add_request(None, {"prompt_token_ids": [1 + index, 2, 3]}, params)
            announced = False
            while True:  # past the requests: the engine idles and steps again on new ones
                engine.step()
                if not announced:
                    print("STEPPING", flush=True)
                    announced = True
                if not engine.has_unfinished_requests():
                    engine.add_request(None, {"prompt_token_ids": [5, 6, 7]}, params)
    except KilnError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
