"""`kiln eval` and `kiln verify`: quality of an engine on held-out text, and where it departs."""

# How `kiln eval` runs a window (`--path`): in one forward through the prompt kernels, or one
# token a step through the decode kernels. Here, not in forward.py, so the CLI's parser
# builds without importing torch.
EVAL_PATHS = ("prefill", "decode")
