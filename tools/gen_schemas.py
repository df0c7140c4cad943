"""Write the JSON Schemas of the manifest, device profiles, daemon and sink configs from their pydantic models.

python tools/gen_schemas.py          # rewrite edge/schemas/*.schema.json
python tools/gen_schemas.py --check  # exit 1 naming a stale file (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "edge" / "schemas"


def models() -> dict[str, type[BaseModel]]:
    from edge.config import DaemonConfig
    from edge.package import Manifest
    from edge.profiles import DeviceProfile
    from edge.sink.config import SinkConfig

    return {
        "manifest.schema.json": Manifest,
        "device-profile.schema.json": DeviceProfile,
        "config.schema.json": DaemonConfig,
        "sink-config.schema.json": SinkConfig,
    }


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    for name, model in models().items():
        path = SCHEMAS / name
        text = render(model)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                print(f"{path.relative_to(ROOT)}: stale; run python tools/gen_schemas.py", file=sys.stderr)
                return 1
        else:
            path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
