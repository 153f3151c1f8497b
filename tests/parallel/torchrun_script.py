"""One node of the multi-node test (test_torchrun.py), run under torchrun:

    torchrun --nnodes 2 --nproc-per-node 1 ... torchrun_script.py ENGINE_DIR

Every rank runs the same `LLM(...)`: rank 0 becomes the engine and prints the greedy tokens
("TOKENS <json>"); the other rank runs its slice in the worker loop inside the constructor
and exits when rank 0 closes.
"""

import json
import sys

from kiln.entrypoints import LLM
from kiln.runtime.sampling_params import SamplingParams

PROMPTS = [[3, 17, 42, 5, 9], [11, 2, 7], [60, 61, 62, 63, 1, 2, 3, 4, 5, 6, 7]]


def main() -> None:
    engine_dir, tp = sys.argv[1], int(sys.argv[2])
    with LLM(engine_dir, device="cpu", block_size=4, tensor_parallel_size=tp) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                               SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                               use_tqdm=False)
        print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
