"""ed25519 signatures over manifest bytes. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import PackageError


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new ed25519 key pair; the private key file is created 0600."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_private_key(path: Path) -> bytes:
    """Raw 32-byte private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PackageError(f"{path}: not a readable ed25519 private key PEM: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError(f"{path}: key is not ed25519")
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_public_key(path: Path) -> bytes:
    """Raw 32-byte public key from a PEM file."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path}: not a readable ed25519 public key PEM: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"{path}: key is not ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(data: bytes, private_key: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(data)


def verify_signature(data: bytes, signature: bytes, trusted_keys: list[bytes], where: Path) -> None:
    if not trusted_keys:
        raise PackageError(f"{where}: no trusted public key configured")
    for raw in trusted_keys:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
            return
        except InvalidSignature:
            continue
    raise PackageError(f"{where}: signature does not match the manifest under any trusted key")
