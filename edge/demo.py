"""`edge-infer demo`: the whole product on one machine, with nothing but the repo.

1. a model package: `--package PATH`, or EfficientNet-Lite0 int8 built once by `edge-convert` from
   examples/efficientnet_lite0.py (needs the [convert] extra; cached under EDGE_CACHE);
2. a clip written with OpenCV from real photos in scikit-image (also the [convert] extra);
3. a private broker on a free port: the installed mosquitto, else amqtt (the [broker] extra) in this
   process, speaking MQTT 3.1.1; `--broker embedded` forces amqtt;
4. the daemon, in this process, with a file source paced at the clip's frame rate;
5. a separate MQTT subscriber that prints every prediction as it arrives.
It exits 0 after `--count` predictions or at the end of the clip.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEMO_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
CLIP_SIZE = (320, 240)


def cache_root() -> Path:
    path = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _skimage_photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from scikit-image's bundled data."""
    try:
        import skimage.data
    except ImportError as exc:
        raise ConfigError(
            "the demo makes its clip from scikit-image photos: pip install 'edge-runtime[convert]'"
        ) from exc
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def make_demo_clip(
    path: Path, photos: tuple[str, ...] = DEMO_PHOTOS, fps: float = 10.0, seconds_each: float = 1.0
) -> Path:
    """An MJPG clip showing each photo for `seconds_each`; written beside and renamed, so never half there."""
    import cv2

    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.avi")
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter.fourcc(*"MJPG"), fps, CLIP_SIZE)
    if not writer.isOpened():
        raise ConfigError(f"{partial}: OpenCV cannot write an MJPG clip here")
    try:
        for name in photos:
            bgr = cv2.cvtColor(_skimage_photo(name), cv2.COLOR_RGB2BGR)
            frame = cv2.resize(bgr, CLIP_SIZE, interpolation=cv2.INTER_AREA)
            for _ in range(max(1, round(fps * seconds_each))):
                writer.write(frame)
    finally:
        writer.release()
    os.replace(partial, path)
    return path


CALIBRATION_PHOTOS = (
    "chelsea",
    "coffee",
    "rocket",
    "astronaut",
    "cat",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
)


def write_photo_crops(folder: Path, count: int, seed: int, size: int = 256) -> Path:
    """Random square crops of scikit-image photos, saved as PNGs for `edge-convert --calib/--eval`."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) >= count:
        return folder
    rng = np.random.default_rng(seed)
    photos = [_skimage_photo(name) for name in CALIBRATION_PHOTOS]
    for index in range(count):
        image = photos[index % len(photos)]
        h, w = image.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(image[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"crop_{index:03d}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return folder


def ensure_demo_package(cache: Path) -> Path:
    """EfficientNet-Lite0 int8, converted once with `edge-convert` and kept in the cache."""
    package = cache / "demo" / "efficientnet-lite0-int8"
    if (package / "manifest.json").is_file():
        return package
    example = REPO / "examples" / "efficientnet_lite0.py"
    if not example.is_file():
        raise ConfigError(f"{example}: not found; pass --package PATH to a model package")
    calib = write_photo_crops(cache / "demo" / "calib", 64, seed=1)
    evaluation = write_photo_crops(cache / "demo" / "eval", 48, seed=2)
    command = [
        sys.executable, "-m", "converters.cli", f"{example}:build", "--out", str(package),
        "--calib", str(calib), "--eval", str(evaluation), "--input-shape", "1,3,224,224",
        "--mean", "127,127,127", "--std", "128,128,128", "--task", "classification",
    ]  # fmt: skip
    sys.path.insert(0, str(REPO))
    try:
        from examples.efficientnet_lite0 import imagenet_labels

        labels = imagenet_labels(cache)
    except ImportError:
        labels = None
    finally:
        sys.path.remove(str(REPO))
    if labels is not None:
        command += ["--labels", str(labels)]
    print(f"demo: building the model package once (a few minutes): {' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=REPO, check=False)
    if done.returncode != 0 or not (package / "manifest.json").is_file():
        raise ConfigError(f"edge-convert failed with exit code {done.returncode}; see its output above")
    return package


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"the local broker exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ConfigError(f"the local broker did not listen on port {port} within {timeout:.0f} s")


@dataclass(frozen=True)
class LocalBroker:
    port: int
    name: str  # "mosquitto" or "amqtt"
    protocol: Literal[5, 311]  # the newest MQTT version the broker speaks


BROKER_CHOICES = ("auto", "mosquitto", "embedded")


def find_mosquitto() -> str | None:
    """mosquitto on PATH, else where Debian puts it (/usr/sbin is not on every user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def has_amqtt() -> bool:
    return importlib.util.find_spec("amqtt") is not None


@contextmanager
def local_broker(workdir: Path, choice: str = "auto") -> Iterator[LocalBroker]:
    """A private broker on a free localhost port: mosquitto, or amqtt inside this process.

    `choice` is "auto" (mosquitto when installed, else amqtt), "mosquitto" or "embedded" (amqtt).
    """
    if choice not in BROKER_CHOICES:
        raise ConfigError(f"--broker {choice}: expected one of {', '.join(BROKER_CHOICES)}")
    binary = find_mosquitto() if choice in ("auto", "mosquitto") else None
    if binary:
        with _mosquitto(binary, workdir) as port:
            yield LocalBroker(port, "mosquitto", 5)
        return
    if choice == "mosquitto":
        raise ConfigError("--broker mosquitto: mosquitto is not installed (apt install mosquitto)")
    if not has_amqtt():
        raise ConfigError(
            "no MQTT broker found: install mosquitto (apt install mosquitto) "
            "or the embedded one (pip install 'edge-runtime[broker]')"
        )
    with _embedded_amqtt() as port:
        yield LocalBroker(port, "amqtt", 311)  # amqtt 0.12 speaks MQTT 3.1.1 only


@contextmanager
def _mosquitto(binary: str, workdir: Path) -> Iterator[int]:
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, 10)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def amqtt_config(port: int) -> dict[str, Any]:
    """Localhost only, anonymous clients, no $SYS topics or packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


@contextmanager
def _embedded_amqtt(timeout: float = 15.0) -> Iterator[int]:
    """amqtt on its own event loop in a thread of this process: no PATH lookup, nothing left running."""
    import asyncio

    from amqtt.broker import Broker

    port = _free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []
    broker: list[Any] = []

    async def start() -> None:
        broker.append(Broker(amqtt_config(port), loop=loop))
        await broker[0].start()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except Exception as exc:  # a port taken meanwhile, a broken plugin: reported by the caller
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
            loop.run_until_complete(asyncio.wait_for(broker[0].shutdown(), 5))
        except Exception as exc:  # a broker that fails to shut down must not hide the demo's result
            logging.getLogger(__name__).warning("embedded broker shutdown: %s", exc)
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise ConfigError(f"the embedded broker (amqtt) did not start within {timeout:.0f} s")
    if failure:
        raise ConfigError(f"the embedded broker (amqtt) failed to start: {failure[0]}")
    try:
        yield port  # start() returned: the listener is bound (a probe connection would log an error)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def format_prediction(message: dict[str, Any]) -> str:
    """`seq 12 frame 36 tabby cat 0.71 (6.2 ms, CPUExecutionProvider)`"""
    result = message.get("result", {})
    if result.get("type") == "classification" and result.get("top_k"):
        best = result["top_k"][0]
        what = f"{best.get('label') or best.get('index')} {best['score']:.2f}"
    elif result.get("type") == "detection":
        found = result.get("detections", [])
        what = (
            ", ".join(f"{d.get('label') or d.get('index')} {d['score']:.2f}" for d in found[:3]) or "nothing"
        )
    else:
        what = json.dumps(result)[:60]
    latency = message.get("latency_ms", {}).get("inference", 0.0)
    provider = message.get("runtime", {}).get("provider", "?")
    return f"seq {message['seq']} frame {message['source']['frame']} {what} ({latency:.1f} ms, {provider})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--package", type=Path, help="a model package (default: build EfficientNet-Lite0 int8)"
    )
    parser.add_argument("--clip", type=Path, help="a video file (default: a clip of scikit-image photos)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many predictions (0: clip end)")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second taken from the clip")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    parser.add_argument(
        "--broker",
        choices=BROKER_CHOICES,
        default="auto",
        help="auto: mosquitto if installed, else amqtt; embedded: amqtt in this process",
    )


def main(args: argparse.Namespace) -> int:
    import paho.mqtt.client as mqtt

    from edge.config import DaemonConfig
    from edge.daemon import Daemon

    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(
            logging.WARNING
        )  # the predictions are the output; -v shows the daemon's log
    cache = cache_root()
    package = args.package or ensure_demo_package(cache)
    clip = args.clip or make_demo_clip(cache / "demo" / "photos-10fps.avi")
    broker_choice = getattr(args, "broker", "auto")
    with (
        tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp,
        local_broker(Path(tmp), broker_choice) as broker,
    ):
        port = broker.port
        work = Path(tmp)
        device = "demo-cam"
        models = work / "models"
        models.mkdir()
        (models / "current").symlink_to(Path(package).absolute(), target_is_directory=True)
        config = DaemonConfig.model_validate(
            {
                "device_id": device,
                "model": str(models / "current"),
                "source": {"type": "video", "uri": str(clip), "fps": args.fps, "loop": False},
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": port,
                    "protocol": broker.protocol,
                    "qos": 1,
                    "topic_prefix": "edge",
                },
                "outbox": {"path": str(work / "outbox.db")},
                "metrics": None,
            }
        )
        received: list[dict[str, Any]] = []
        enough = threading.Event()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            if enough.is_set():
                return  # predictions still arriving while the daemon stops are past --count
            message = json.loads(msg.payload)
            received.append(message)
            print(format_prediction(message), flush=True)
            if args.count and len(received) >= args.count:
                enough.set()

        subscribed = threading.Event()
        subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-demo-subscriber")
        subscriber.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"edge/{device}/predictions", qos=1)
        subscriber.on_subscribe = lambda *a: subscribed.set()
        subscriber.on_message = on_message
        subscriber.connect("127.0.0.1", port)
        subscriber.loop_start()
        if not subscribed.wait(10):
            raise ConfigError("the demo subscriber could not subscribe to the local broker")

        print(f"demo: broker {broker.name} on 127.0.0.1:{port}, model {package}, clip {clip}", flush=True)
        daemon = Daemon.from_config(config)
        daemon.start()
        session = daemon.active
        assert session is not None
        print(
            f"demo: serving {session.info['name']} {session.info['version']} on "
            f"{session.backend_name}/{session.provider}; predictions on edge/{device}/predictions",
            flush=True,
        )
        runner = threading.Thread(target=daemon.run, name="daemon", daemon=True)
        runner.start()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and not enough.is_set() and runner.is_alive():
            runner.join(0.2)
        daemon.request_stop()
        runner.join(30)
        # The daemon flushed its outbox before stopping; give the subscriber a moment to print the tail.
        end = time.monotonic() + 3
        while time.monotonic() < end and len(received) < daemon.predictions and not args.count:
            time.sleep(0.05)
        subscriber.loop_stop()
        subscriber.disconnect()
        print(f"demo: {len(received)} prediction(s) received, {daemon.predictions} made", flush=True)
        return 0 if received else 1
