"""cli.py: flags generated from config dataclasses."""
from dataclasses import dataclass

import pytest

import cli
from cli import opt


@dataclass(kw_only=True)
class _Cfg:
    """a test command"""

    path: str = opt(help="required: no default")
    n: int = opt(3, "an int")
    betas: tuple[float, float] = opt((0.9, 0.95), "two floats")
    files: list[str] = opt(["a"], "one or more")
    flag: bool = opt(True, "on by default")
    rate: float = opt(0.5, "a 50% share")

    def __post_init__(self):
        if self.n < 0:
            raise ValueError("n must be >= 0")


def test_flags_types_defaults_and_tuples():
    cmd, cfg = cli.parse("t", "d", {"go": _Cfg}, ["go", "--path", "p", "--betas", "0.8", "0.99", "--files", "x", "y",
                                                  "--no-flag", "--n", "7"])
    assert cmd == "go"
    assert cfg == _Cfg(path="p", n=7, betas=(0.8, 0.99), files=["x", "y"], flag=False, rate=0.5)
    assert isinstance(cfg.betas, tuple)
    _, cfg = cli.parse("t", "d", {"go": _Cfg}, ["go", "--path", "p"])
    assert (cfg.n, cfg.betas, cfg.files, cfg.flag) == (3, (0.9, 0.95), ["a"], True)


def test_missing_required_and_invalid_values_exit_2(capsys):
    for argv in (["go"], ["go", "--path", "p", "--n", "-1"], ["go", "--path", "p", "--betas", "0.9"]):
        with pytest.raises(SystemExit) as e:
            cli.parse("t", "d", {"go": _Cfg}, argv)
        assert e.value.code == 2
    assert "n must be >= 0" not in capsys.readouterr().out        # errors go to stderr


def test_help_escapes_percent(capsys):
    with pytest.raises(SystemExit):
        cli.parse("t", "d", {"go": _Cfg}, ["go", "--help"])
    assert "a 50% share" in capsys.readouterr().out
