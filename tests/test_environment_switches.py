"""Every KILN_* variable the package reads is in the README's table of environment switches
(or is one of kiln's own worker variables or a test hook, which the README names as such), so
a switch cannot be added without its line for users."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _read_by_the_package() -> set[str]:
    names = set()
    for path in (ROOT / "kiln").rglob("*.py"):
        names |= set(re.findall(r"[\"'](KILN_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def test_every_variable_the_package_reads_is_documented():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment switches", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(KILN_[A-Z0-9_]+)`", section))
    read = _read_by_the_package()
    assert len(read) > 20  # the scan finds them (string literals in kiln/)
    hooks = {name for name in read if name.startswith("KILN_TEST_")}
    assert "`KILN_TEST_*`" in section and "`KILN_WORKER_SPEC`" in section
    missing = sorted(read - documented - hooks)
    assert not missing, f"add these to README's Environment switches table: {missing}"
    stale = sorted(documented - read)
    assert not stale, f"README documents variables kiln no longer reads: {stale}"
