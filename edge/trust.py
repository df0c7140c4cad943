"""What the daemon may load: signed packages only (when keys are configured), no rollbacks, no paths
outside the models directory, no world-readable secrets.

The daemon calls, on start and on every reload:

    policy = TrustPolicy(trusted_keys, state_dir)
    package = policy.load(path, current)    # load_package(...) verifies sha256/sizes/paths/signature,
                                            # then check(): signature required? sequence not lower?
    ... load, self-check, swap ...
    policy.accept(package)                  # only once the new model serves

`accept` persists the highest sequence in `state_dir/trust.json`, so restarting the service (or power
cycling the device) cannot be used to slip an older signed package back in. Every refusal is a
`PackageError` with a one-line reason; the caller keeps the current model serving.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from edge.errors import ConfigError, PackageError
from edge.package import MANIFEST, Manifest, Package, load_package

STATE_FILE = "trust.json"


class TrustPolicy:
    """Signature and anti-rollback policy for model packages.

    With no trusted keys, unsigned packages are accepted (development); the rollback rule still applies,
    because `sequence` is part of every manifest (it is only tamper-proof when signed).
    """

    def __init__(self, trusted_keys: list[bytes], state_dir: Path):
        self.trusted_keys = list(trusted_keys)
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / STATE_FILE

    @property
    def requires_signature(self) -> bool:
        return bool(self.trusted_keys)

    def load(self, path: str | Path, current: Manifest | None = None) -> Package:
        """Load and verify a package with this policy's keys, then `check` it against the accepted state.
        Where a path comes from a remote peer, pass it through `check_model_path` first."""
        package = load_package(path, self.trusted_keys or None)
        self.check(package, current)
        return package

    def check(self, package: Package, current: Manifest | None) -> None:
        """Refuse `package` if it is unsigned while keys are configured, or older than what we accepted."""
        where = package.root / MANIFEST
        if self.requires_signature and not package.signed:
            raise PackageError(
                f"{where}: package was not verified against the trusted keys (load it with them); refused"
            )
        floor, accepted_from = self.highest_sequence(), f"accepted before ({self.state_path})"
        if current is not None and current.sequence > floor:
            floor, accepted_from = current.sequence, f"running '{current.name}' {current.version}"
        sequence = package.manifest.sequence
        if sequence < floor and package.manifest_sha256 != self._rolled_back_to():
            raise PackageError(
                f"{where}: sequence {sequence} is lower than {floor} {accepted_from}: rollback refused"
            )

    def accept(self, package: Package) -> None:
        """Record `package` as serving; its sequence becomes the floor for every later load. The package
        it replaces is kept in the state as the one `accept_rollback` may return to."""
        state = self._read_state() or {}
        current = state.get("current")
        if isinstance(current, dict) and current.get("manifest_sha256") == package.manifest_sha256:
            # The same package again (a restart): nothing moves, a rollback's exemption included.
            self._write_state(package, state.get("previous"), self._rolled_back_to())
        else:
            self._write_state(package, current, rolled_back_to=None)

    def accept_rollback(self, package: Package) -> None:
        """Record an explicit rollback to the package accepted before the current one. The floor stays
        where it is, with this one package (by manifest hash) exempt from it, so it survives a restart;
        any other older package is still refused."""
        state = self._read_state() or {}
        previous = state.get("previous")
        if not isinstance(previous, dict) or previous.get("manifest_sha256") != package.manifest_sha256:
            raise PackageError(
                f"{package.root / MANIFEST}: rollback: only the package accepted before the current one may "
                "be rolled back to"
            )
        self._write_state(package, state.get("current"), rolled_back_to=package.manifest_sha256)

    def _write_state(self, package: Package, previous: object, rolled_back_to: str | None) -> None:
        manifest = package.manifest
        highest = max(self.highest_sequence(), manifest.sequence)
        current = {
            "name": manifest.name,
            "version": manifest.version,
            "sequence": manifest.sequence,
            "manifest_sha256": package.manifest_sha256,
            "signed": package.signed,
        }
        state = {
            "highest_sequence": highest,
            **current,  # flat copies of the current package, as before `current` existed
            "current": current,
            "previous": previous if isinstance(previous, dict) else None,
            "rolled_back_to": rolled_back_to,
        }
        _write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")

    def _rolled_back_to(self) -> str | None:
        state = self._read_state()
        value = state.get("rolled_back_to") if state else None
        return value if isinstance(value, str) else None

    def highest_sequence(self) -> int:
        state = self._read_state()
        return int(state.get("highest_sequence", 0)) if state else 0

    def _read_state(self) -> dict[str, Any] | None:
        try:
            raw = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PackageError(f"{self.state_path}: cannot read trust state: {exc.strerror}") from exc
        try:
            state = json.loads(raw)
        except json.JSONDecodeError as exc:
            # Fail closed: a damaged state file must not silently reset the rollback floor to 0.
            raise PackageError(
                f"{self.state_path}: trust state is damaged ({exc.msg}); refusing to load packages "
                "until it is repaired or removed by an operator"
            ) from exc
        sequence = state.get("highest_sequence") if isinstance(state, dict) else None
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
            raise PackageError(f"{self.state_path}: highest_sequence: expected a non-negative integer")
        return state


def check_model_path(path: str | Path, models_dir: str | Path) -> Path:
    """`path` resolved (symlinks followed), refused unless it lies inside `models_dir`.

    Used for the `model` of a reload command: a remote peer may name a package, never an arbitrary
    directory on the device.
    """
    root = Path(models_dir).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if resolved == root or root not in resolved.parents:
        raise PackageError(f"model path '{path}' is outside the models directory {root}; refused")
    return resolved


def check_secret_file(path: str | Path, what: str) -> Path:
    """Refuse a secret (password file, TLS private key) that other users could read or replace."""
    target = Path(path)
    try:
        info = target.stat()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: '{target}' does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"{what}: '{target}': cannot stat: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what}: '{target}' is not a regular file")
    if info.st_mode & 0o007:
        raise ConfigError(
            f"{what}: '{target}' is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run chmod o-rwx on it"
        )
    return target


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
