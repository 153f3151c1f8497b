"""The kernels' 0/1 environment switches (KILN_BATCH_INVARIANT, KILN_FP8_SKINNY, KILN_PDL,
KILN_FP8_FUSE_ACTIVATIONS): unset means the default, and a value other than 0 or 1 is an
error naming the variable, not a switch silently left as it was."""

from __future__ import annotations

import pytest

from kiln.kernels.triton_utils import batch_invariant, env_flag


@pytest.mark.parametrize("value, default, expected", [
    (None, True, True), (None, False, False), ("", True, True),
    ("0", True, False), ("1", False, True),
])
def test_flag_values(monkeypatch, value, default, expected):
    if value is None:
        monkeypatch.delenv("KILN_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("KILN_TEST_FLAG", value)
    assert env_flag("KILN_TEST_FLAG", default) is expected


@pytest.mark.parametrize("value", ["true", "on", "2", " 1"])
def test_a_misspelt_value_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("KILN_BATCH_INVARIANT", value)
    with pytest.raises(ValueError, match=rf"KILN_BATCH_INVARIANT must be 0 or 1 \(or unset\); got '{value}'"):
        batch_invariant()


def test_kiln_pdl_0_turns_programmatic_dependent_launch_off(monkeypatch):
    """KILN_PDL=0 (for profiling: per-kernel times that add up to the step) makes use_pdl
    False where it would be True (an sm_90 GPU, not interpreted); a bad value names it."""
    from kiln.kernels import triton_utils

    monkeypatch.setattr(triton_utils, "has_sm90", lambda tensor: True)
    monkeypatch.setattr(triton_utils, "interpreter_active", lambda: False)
    monkeypatch.delenv("KILN_PDL", raising=False)
    assert triton_utils.use_pdl(None) is True
    monkeypatch.setenv("KILN_PDL", "0")
    assert triton_utils.use_pdl(None) is False
    monkeypatch.setenv("KILN_PDL", "off")
    with pytest.raises(ValueError, match="KILN_PDL must be 0 or 1"):
        triton_utils.use_pdl(None)
