"""`edge-infer` command line: each subcommand's --help lists that subcommand's own options."""

from __future__ import annotations

import pytest

from edge.cli import main


@pytest.mark.parametrize(
    ("command", "option"),
    [("run", "--config"), ("demo", "--broker"), ("bench", "--seconds"), ("doctor", "--json")],
)
def test_subcommand_help_shows_its_own_options(
    command: str, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: edge-infer {command}" in out
    assert option in out


def test_unknown_subcommand_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["launch"])
    assert stopped.value.code == 2
    assert "invalid choice: 'launch'" in capsys.readouterr().err
