"""A request's tokens are its prompt followed by its outputs, kept as two lists: the outputs
grow every step, and concatenating them with the prompt each time would cost O(sequence
length) per request per decode step. Shared by the scheduler side (prefix hashes) and the
runner's own copy of each request."""

from __future__ import annotations


def token_ids_between(
    prompt_token_ids: list[int], output_token_ids: list[int], start: int, end: int
) -> list[int]:
    """(prompt + outputs)[start:end], a new list, without building the whole concatenation."""
    num_prompt = len(prompt_token_ids)
    if start >= num_prompt:
        return output_token_ids[start - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return prompt_token_ids[start:end]
    return prompt_token_ids[start:] + output_token_ids[: end - num_prompt]
