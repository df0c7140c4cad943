from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.profiles import HostFacts, available_profiles, detect_profile, load_profile, parse_cpu_flags

REQUIRED = {
    "x86-64-avx2",
    "x86-64-vnni",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "rockchip-rk3588",
    "coral-edgetpu",
    "generic-aarch64",
}

X86_VNNI_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_int8\n"
X86_AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
PI_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


def test_every_required_profile_ships_and_validates():
    profiles = available_profiles()
    assert set(profiles) >= REQUIRED
    for profile in profiles.values():
        assert profile.backends, profile.name
        assert profile.fallback in ("allow", "warn", "forbid")


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (HostFacts("x86_64", parse_cpu_flags(X86_VNNI_CPUINFO)), "x86-64-vnni"),
        (HostFacts("x86_64", parse_cpu_flags(X86_AVX2_CPUINFO)), "x86-64-avx2"),
        (HostFacts("x86_64", frozenset({"sse4_2"})), "x86-64-generic"),
        (
            HostFacts("aarch64", parse_cpu_flags(PI_CPUINFO), "Raspberry Pi 4 Model B Rev 1.4"),
            "raspberry-pi-4",
        ),
        (
            HostFacts("aarch64", parse_cpu_flags(PI_CPUINFO), "Raspberry Pi 5 Model B Rev 1.0"),
            "raspberry-pi-5",
        ),
        (HostFacts("aarch64", frozenset(), "NVIDIA Jetson Orin Nano Developer Kit"), "jetson-orin-nano"),
        (HostFacts("aarch64", frozenset(), "Radxa ROCK 5B (RK3588)"), "rockchip-rk3588"),
        (HostFacts("aarch64", frozenset(), "", frozenset({"libedgetpu.so.1"})), "coral-edgetpu"),
        (HostFacts("aarch64", frozenset({"asimd"}), "Some Board"), "generic-aarch64"),
    ],
)
def test_auto_detection_picks_the_most_specific_profile(facts, expected):
    detection = detect_profile(facts)
    assert detection.profile.name == expected
    assert detection.reasons


def test_detection_on_this_machine_reads_proc():
    detection = detect_profile()
    assert detection.profile.arch == HostFacts.from_system().arch


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown device profile 'nope'.*x86-64-vnni"):
        load_profile("nope")


def test_invalid_profile_error_names_file_line_and_field(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndescription: x\narch: x86_64\nbackends:\n  - name: onnxruntime\n    provders: [CPU]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_profile(str(bad))
    assert str(err.value) == f"{bad}:6: backends.0.provders: unknown key"


def test_profile_with_wrong_enum_value(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndescription: x\narch: x86_64\nfallback: maybe\nbackends: [{name: onnxruntime}]\n"
    )
    with pytest.raises(
        ConfigError, match=r"bad.yaml:4: fallback: Input should be 'allow', 'warn' or 'forbid'"
    ):
        load_profile(str(bad))


def test_profile_name_must_match_file(tmp_path: Path):
    bad = tmp_path / "one.yaml"
    bad.write_text("name: two\ndescription: x\narch: x86_64\nbackends: [{name: onnxruntime}]\n")
    with pytest.raises(ConfigError, match="does not match the file name"):
        load_profile(str(bad))


def test_broken_yaml_reports_the_line(tmp_path: Path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\narch: [x86_64\nbackends: []\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_profile(str(bad))
