"""The fleet page in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright): what a
person sees once a sink has stored a fleet's predictions and statuses."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge.sink.config import load_sink_config
from edge.sink.service import Sink
from tests.broker import Mosquitto
from tests.daemon_helpers import wait_until
from tests.sink_helpers import (
    Fleet,
    new_boot,
    prediction,
    sink_config,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _browser():  # type: ignore[no-untyped-def]
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium; tools/bootstrap.sh does)")
    return playwright.sync_playwright()


def test_the_fleet_page_shows_devices_rates_latency_recent_predictions_and_gaps(
    tmp_path: Path, mosquitto: Mosquitto, database: tuple[str, str]
) -> None:
    url, schema = database
    config = sink_config(
        tmp_path / "sink.yaml", mosquitto.port, url, schema, web={"port": 0}, gaps={"grace_s": 0.0}
    )
    sink = Sink(load_sink_config(config))
    sink.start()
    fleet = Fleet(mosquitto.port)
    try:
        assert sink.wait_subscribed(10) and sink.web_port
        fleet.status("cam-01", "online", model={"name": "tiny-colour", "version": "1.0.0"})
        fleet.status("cam-02", "offline", reason="connection lost")
        boot = new_boot()
        fleet.publish("cam-01", boot, range(1, 41))
        fleet.publish("cam-01", boot, range(45, 51))
        body = prediction("cam-02", new_boot(), 7, label="tabby<script>")
        fleet.send("cam-02/predictions", json.dumps(body))
        import cv2
        import numpy as np

        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, :32] = (0, 0, 255)
        ok, jpeg = cv2.imencode(".jpg", frame)
        assert ok
        fleet.send("cam-01/driveway/person/snapshot", jpeg.tobytes(), retain=True)
        fleet.send("cam-01/driveway/car/snapshot", b"GIF89a not a jpeg", retain=True)
        assert wait_until(lambda: sink.dead == 1, 10)
        assert wait_until(lambda: sink.stored == 47, 10)
        sink.refresh_gaps()
        base = f"http://127.0.0.1:{sink.web_port}"
        with _browser() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            page.wait_for_selector("#devices tbody tr")
            summary = page.inner_text("#summary")
            assert "2 device(s): 1 online, 1 offline" in summary
            rows = page.locator("#devices tbody tr")
            assert rows.count() == 2
            first = rows.nth(0).locator("td").all_inner_texts()
            assert first[:4] == ["cam-01", "online", "tiny-colour", "1.0.0"] and first[5] == "46"
            second = rows.nth(1).locator("td").all_inner_texts()
            assert second[:2] == ["cam-02", "offline"]
            assert page.locator("#devices td.online").count() == 1
            # the latest prediction is first; a label is shown as text, never run as markup
            recent = page.locator("#recent tbody tr").nth(0).locator("td").all_inner_texts()
            assert recent[0] == "cam-02" and recent[4] == "tabby<script> 0.90"
            assert page.locator("#recent tbody tr").count() == 20
            gap = page.locator("#gaps tbody tr").nth(0).locator("td").all_inner_texts()
            assert gap == ["cam-01", boot, "41–44"]
            assert page.is_hidden("#gaps-none")
            # a point per 10 s step that had predictions, on both charts
            for chart, series in (("rate", "rate"), ("latency", "p50_ms"), ("latency", "p99_ms")):
                points = page.locator(f"#{chart} polyline.series-{series}").get_attribute("points") or ""
                assert points and "NaN" not in points, (chart, series, points)
                x, y = (float(v) for v in points.split()[-1].split(","))
                assert 40 < x <= 420 and 0 <= y <= 160  # inside the chart, near its right (now) end
            assert "updated" in summary and "Invalid" not in summary
            # the detection snapshot, loaded as an image; the non-JPEG one is a dead letter
            page.wait_for_selector("#snapshots img")
            assert page.locator("#snapshots figcaption").all_inner_texts() == ["cam-01 · driveway · person"]
            page.wait_for_function("document.querySelector('#snapshots img').naturalWidth > 0")
            width = page.eval_on_selector("#snapshots img", "img => img.naturalWidth")
            assert width == 64
            assert page.inner_text("#dead") == "1 invalid message(s) in dead_letters."
            assert errors == []
            browser.close()
        # read-only: nothing but GET is served
        request = urllib.request.Request(base + "/api/fleet", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 501
    finally:
        sink.stop()
        fleet.close()
