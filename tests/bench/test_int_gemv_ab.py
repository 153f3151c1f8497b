"""benchmarks/int_gemv_ab.py --smoke: the per-linear A/B script (int4 packed and fp32, int8,
fp8, split tilings) runs end to end on small shapes under the interpreter, every path's
output checked against its reference, so a script error costs a test run and not a device
call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_smoke_run_checks_every_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports quant_bench beside it
    import int_gemv_ab

    rows = int_gemv_ab.main([str(tmp_path), "--label", "smoke", "--smoke",
                             "--tilings", "16x16x4", "16x16x4x2"])
    errors = [row for row in rows if "error" in row]
    assert not errors, errors
    formats = {row["format"] for row in rows}
    assert formats == {"bf16", *int_gemv_ab.FORMATS}
    paths = {(row["format"], row["path"]) for row in rows}
    assert ("int4-g128", "gemv_fp32") in paths and ("fp8", "gemv_16x16x4x2") in paths
    assert all(row["max_rel_error"] < 2**-6 for row in rows if "max_rel_error" in row)
    written = json.loads((tmp_path / "int_gemv_ab-smoke.json").read_text())
    assert written["device"] == "cpu" and len(written["rows"]) == len(rows)
    sys.modules.pop("int_gemv_ab", None)
