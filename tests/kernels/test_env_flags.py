"""The kernels' 0/1 environment switches (KILN_BATCH_INVARIANT, KILN_FP8_SKINNY,
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
