"""`edge-infer keygen --private K --public P`: an ed25519 key pair for signing model packages.

Keep the private key on the build machine (`edge-convert --sign-key K`); put the public key on devices
(`trusted_keys` in the daemon config). Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", required=True, type=Path, help="private key PEM to create (0600)")
    parser.add_argument("--public", required=True, type=Path, help="public key PEM to create")


def main(args: argparse.Namespace) -> int:
    from edge.signing import generate_keypair, load_public_key

    private, public = Path(args.private), Path(args.public)
    for path, what in ((private, "--private"), (public, "--public")):
        if path.exists():
            raise ConfigError(f"{what}: '{path}' already exists; refusing to overwrite a key")
        if not path.parent.is_dir():
            raise ConfigError(f"{what}: directory '{path.parent}' does not exist")
    if private.resolve() == public.resolve():
        raise ConfigError("--private and --public must be different files")
    try:
        generate_keypair(private, public)
    except OSError as exc:
        private.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the key pair: {exc}") from exc
    fingerprint = load_public_key(public).hex()[:16]
    print(f"wrote {private} (keep secret) and {public} (key id {fingerprint})")
    return 0
