"""Device profiles (edge/profiles.py): mutated and damaged profile YAML, odd names, odd host facts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, note
from hypothesis import strategies as st

from edge.errors import ConfigError
from edge.profiles import (
    DeviceProfile,
    HostFacts,
    available_profiles,
    detect_profile,
    load_profile,
    load_profile_file,
    match_reasons,
    profiles_dir,
)
from tests.fuzz.strategies import NASTY_STRINGS, damaged_bytes, mutated
from tests.fuzz.support import TEST_TIMEOUT_S, assert_clear_error, fuzz_settings, no_hang

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)

SHIPPED = available_profiles()
PROFILE_NAMES = sorted(path.stem for path in profiles_dir().glob("*.yaml"))
PROFILES: dict[str, dict[str, Any]] = {
    name: yaml.safe_load((profiles_dir() / f"{name}.yaml").read_text()) for name in PROFILE_NAMES
}


def check_profile_file(stem: str, data: bytes) -> DeviceProfile | str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stem}.yaml"
        path.write_bytes(data)
        try:
            with no_hang():
                profile = load_profile_file(path)
        except ConfigError as exc:
            message = assert_clear_error(exc)
            assert message.startswith(f"{path}:"), message
            return message
    assert profile.name == stem and profile.backends
    return profile


def test_every_shipped_profile_survives_a_round_trip() -> None:
    for name, document in PROFILES.items():
        assert isinstance(check_profile_file(name, yaml.safe_dump(document).encode()), DeviceProfile)


@fuzz_settings(80)
@given(st.sampled_from(PROFILE_NAMES), st.data(), st.booleans())
def test_mutated_profile(name: str, data: st.DataObject, damage: bool) -> None:
    document, notes = data.draw(mutated(PROFILES[name]))
    note(notes)
    text = yaml.safe_dump(document, allow_unicode=True)
    raw = data.draw(damaged_bytes(text)) if damage else text.encode()
    check_profile_file(name, raw)


@fuzz_settings(100)
@given(
    st.one_of(st.text(max_size=40), st.sampled_from([*NASTY_STRINGS, "auto", "x86-64-avx2", "a.yaml", "a/b"]))
)
@example("x\x00y").via("a NUL byte in a profile name")
@example("a" * 5000).via("regression: OSError (file name too long) escaped from Path.is_file")
@example("../device_profiles/x86-64-avx2").via("a relative path")
def test_profile_by_any_name(name: str) -> None:
    """A name that is not a shipped profile is refused by name; a path to a missing file names the path."""
    with tempfile.TemporaryDirectory() as tmp, no_hang():
        directory = Path(tmp)
        (directory / "only-one.yaml").write_text(
            yaml.safe_dump({**PROFILES["x86-64-generic"], "name": "only-one"})
        )
        try:
            profile = load_profile(name, directory)
        except ConfigError as exc:
            assert_clear_error(exc)
        else:
            assert isinstance(profile, DeviceProfile)


@fuzz_settings(150)
@given(
    st.one_of(st.sampled_from(["x86_64", "aarch64", "armv7l", "riscv64", ""]), st.text(max_size=10)),
    st.frozensets(
        st.one_of(st.sampled_from(["avx2", "avx512_vnni", "asimd", "fma", "sse4_2"]), st.text(max_size=8))
    ),
    st.text(max_size=40),
    st.frozensets(st.sampled_from(["libedgetpu.so.1", "libnvinfer.so", "librknnrt.so", "x"]), min_size=1),
)
def test_detection_on_any_host(
    arch: str, flags: frozenset[str], model: str, libraries: frozenset[str]
) -> None:
    """Every shipped profile's detect rules against odd host facts: a match with reasons, or no match."""
    facts = HostFacts(arch=arch, cpu_flags=flags, device_tree_model=model, libraries=libraries)
    with no_hang():
        for profile in SHIPPED.values():
            reasons = match_reasons(profile, facts)
            assert reasons is None or (profile.arch == arch and all(isinstance(r, str) for r in reasons))


def test_no_match_is_one_clear_error() -> None:
    with pytest.raises(ConfigError) as info:
        detect_profile(HostFacts(arch="riscv64", cpu_flags=frozenset(), libraries=frozenset({"x"})))
    assert_clear_error(info.value, "no device profile matches", "riscv64")
