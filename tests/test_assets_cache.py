"""The test-asset cache forgets packages built by older converter code instead of growing forever."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.assets_models import forget_stale_packages


def test_only_long_unused_packages_beyond_the_newest_three_are_deleted(tmp_path: Path) -> None:
    now = time.time()
    ages_days = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 30, "f": 60}
    for name, age in ages_days.items():
        folder = tmp_path / f"efficientnet-lite0-{name}"
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
        os.utime(folder, (now - age * 86400, now - age * 86400))
    (tmp_path / "other-model-z").mkdir()
    forget_stale_packages(tmp_path, "efficientnet-lite0-*")
    left = sorted(p.name for p in tmp_path.iterdir())
    # a, b, c are the newest three; d is older but used within 7 days; e and f are gone
    assert left == [f"efficientnet-lite0-{n}" for n in "abcd"] + ["other-model-z"]
