"""The README and `--help` say true things: every `dllama-mpi` line in the README's code blocks and
every command's help example parses with the real option definitions (types, choices, required
options); the README stays short; every figure in its tables is recorded in scripts/BENCHMARKS.md."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import click.testing
import pytest

from dllama_mpi.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_command_lines() -> list[str]:
    lines, inside = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside and "dllama-mpi " in line:
            lines.append(line)
    return lines


def parse(line: str) -> click.Context:
    """The `dllama-mpi ...` part of a shell line, parsed as click would run it (no callback runs).
    Run in an empty folder: the JSON files that `benchmark --plot` reads are made there."""
    words = shlex.split(line, comments=True)
    start = next(i for i, w in enumerate(words) if w.endswith("dllama-mpi")) + 1
    end = words.index(">") if ">" in words else len(words)
    args = [w.strip("[]") for w in words[start:end]]      # `[--ids]`: the README's "optional"
    for w in args:
        if w.endswith(".json"):
            Path(w).touch()
    cmd, name = main, "dllama-mpi"
    while isinstance(cmd, click.Group):
        assert args, f"no command in: {line}"
        name = args.pop(0)
        assert name in cmd.commands, f"unknown command {name!r} in: {line}"
        cmd = cmd.commands[name]
    return cmd.make_context(name, args)


def test_readme_is_short():
    assert len(README.splitlines()) <= 350


def test_readme_has_commands_to_check():
    used = {shlex.split(line, comments=True)[shlex.split(line, comments=True).index(w) + 1]
            for line in readme_command_lines() for w in shlex.split(line, comments=True)
            if w.endswith("dllama-mpi")}
    # every command a user runs appears in the guide
    assert set(COMMANDS) <= used, set(COMMANDS) - used


@pytest.mark.parametrize("line", readme_command_lines())
def test_readme_command_parses(line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parse(line)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_example_parses_and_is_shown(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short, example = COMMANDS[name]
    parse(example)
    out = click.testing.CliRunner().invoke(main, [name, "--help"]).output
    assert "Example:" in out and example in out
    top = click.testing.CliRunner().invoke(main, ["--help"]).output
    assert f"{name}" in top and short in top          # not cut short by click


def test_parse_rejects_what_click_would():
    with pytest.raises(click.UsageError):
        parse("dllama-mpi inference --sync fast --prompt x")
    with pytest.raises(click.UsageError):
        parse("dllama-mpi inference --steps")


def _walk(cmd, path):
    if isinstance(cmd, click.Group):
        for n, c in cmd.commands.items():
            yield from _walk(c, path + [n])
    else:
        yield " ".join(path), cmd


@pytest.mark.parametrize("path,cmd", list(_walk(main, [])), ids=[p for p, _ in _walk(main, [])])
def test_every_option_is_explained_with_its_default(path, cmd):
    ctx = click.Context(cmd, info_name=path)
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.hidden:
            continue
        assert p.help, f"{path} {p.opts[0]} has no help"
        if p.is_flag:
            continue
        default = p.get_default(ctx, call=False)
        if default is None or default is getattr(click.core, "UNSET", None) or default == () or p.required:
            continue
        help_text = p.get_help_record(ctx)[1]
        assert "default" in help_text.lower(), f"{path} {p.opts[0]}: default {default!r} not shown"


def test_readme_figures_are_recorded_in_benchmarks():
    record = (ROOT / "scripts" / "BENCHMARKS.md").read_text(encoding="utf-8")
    rows = [line for line in README.splitlines() if line.startswith("|")]
    figures = {n for row in rows for n in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", row)}
    assert figures, "the README's results table is gone"
    assert not sorted(n for n in figures if n not in record)
