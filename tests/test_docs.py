"""Every command in README.md and docs/*.md is valid as written (composed and parsed, not run): each
`python -m vitexp ...` line composes its config (what `--cfg job` prints), each `python -m vitexp.<module>` line is
accepted by that module's argument parser, and each script, test path and page link it names exists, so the
documentation cannot drift from the config."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from vitexp.config import config_dir, register_resolvers, version_base

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^([ \t]*)```[\w-]*\n(.*?)^[ \t]*```", re.M | re.S)
PLACEHOLDER = re.compile(r"<[^<>\n]+>")
# What a placeholder becomes: a value that composes like the one a user types.
STAND_IN = {"<time>": "2026-01-01_00-00-00"}
DEFAULT_STAND_IN = "placeholder"
SEPARATORS = {"&&", "||", ";", "|", "&"}
# Flags of `python -m vitexp` (Hydra's) and the ones among them that take a value.
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i"}
# A command written in a sentence or a table, e.g. `python -m vitexp trainer.precision=32`.
INLINE = re.compile(r"`(python -m vitexp[^`]*)`")
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written, the module it runs and its arguments."""

    where: str
    module: str
    args: tuple[str, ...]
    placeholders: bool
    inline: bool


def _blocks(page: Path) -> list[tuple[int, str]]:
    """The fenced code blocks of a page, each with the line it starts on, de-indented."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = len(match.group(1))
        body = "\n".join(line[indent:] for line in match.group(2).splitlines())
        found.append((text.count("\n", 0, match.start()) + 2, body))
    return found


def _spans(page: Path) -> list[tuple[int, str]]:
    """The inline code spans outside the code blocks of a page that run `python -m vitexp...`, with their line."""
    text = FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), page.read_text())
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")) for m in INLINE.finditer(text)]


def _lines(body: str, first: int) -> list[tuple[int, str]]:
    """A block's shell lines with their line numbers, continuation lines joined."""
    joined: list[tuple[int, str]] = []
    pending, start = "", first
    for number, line in enumerate(body.splitlines(), start=first):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        pending = ""
    return joined


def _stand_in(match: re.Match) -> str:
    """What one placeholder is replaced by."""
    return STAND_IN.get(match.group(0), DEFAULT_STAND_IN)


def _commands_of(line: str, where: str, *, inline: bool = False) -> list[Command]:
    """The `-m vitexp...` commands of one shell line (after `&&`, under torchrun or srun, behind env variables)."""
    replaced = PLACEHOLDER.sub(_stand_in, line)
    try:
        tokens = shlex.split(replaced, comments=True)
    except ValueError:
        return []
    commands, current = [], []
    for token in [*tokens, ";"]:
        if token not in SEPARATORS:
            current.append(token)
            continue
        for i in range(len(current) - 1):
            if current[i] == "-m" and current[i + 1].split(".")[0] == "vitexp":
                args = tuple(a for a in current[i + 2 :] if a != "...")
                commands.append(Command(where, current[i + 1], args, replaced != line, inline))
                break
        current = []
    return commands


def _all(kind: str) -> list:
    """Every documented command, in code blocks and inline (`kind="command"`), or every shell line of the code blocks
    (`kind="line"`) of README.md and docs/."""
    found = []
    for page in PAGES:
        for first, body in _blocks(page):
            for number, line in _lines(body, first):
                where = f"{page.relative_to(REPO)}:{number}"
                found += _commands_of(line, where) if kind == "command" else [(where, line)]
        if kind == "command":
            for number, span in _spans(page):
                found += _commands_of(span, f"{page.relative_to(REPO)}:{number}", inline=True)
    return found


COMMANDS = _all("command")


def _hydra_overrides(args: tuple[str, ...]) -> tuple[list[str], bool]:
    """The overrides of a `python -m vitexp` command line, and whether it asks for --multirun."""
    overrides, multirun, skip = [], False, False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--multirun", "-m"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def _first_job(overrides: list[str]) -> tuple[list[str], bool]:
    """A sweep's overrides as its first job gets them, and whether there was anything to sweep."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = []
    for override in parsed:
        if override.is_sweep_override():
            first.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            first.append(override.input_line)
    return first, any(o.is_sweep_override() for o in parsed)


def _compose(overrides: list[str], *, multirun: bool) -> None:
    """Compose the config of one job as `python -m vitexp --cfg job` would, and resolve it (inside `_hydra`)."""
    job, swept = _first_job(overrides)
    cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
    if swept and not multirun:
        assert cfg.hydra.mode == RunMode.MULTIRUN, "a sweep needs --multirun (or a launcher group that sweeps)"
    # the hydra node's resolvers pick run folders: only the job's own config is resolved, as --cfg job shows it
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True)


class _Parsed(Exception):
    """Raised in place of parsing: carries the module's parser and whether it parses only known arguments."""

    def __init__(self, parser: argparse.ArgumentParser, *, known: bool) -> None:
        super().__init__()
        self.parser, self.known = parser, known


def _parser_of(module_name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.ArgumentParser, bool] | None:
    """The argument parser `module.main()` builds, taken before it parses anything (nothing runs); None when the
    module has no parser and reads Hydra overrides from the command line."""
    module = importlib.import_module(module_name)
    assert callable(getattr(module, "main", None)), f"{module_name} has no main()"
    if "ArgumentParser" not in inspect.getsource(module):
        return None

    def known(self, *_args, **_kwargs):
        raise _Parsed(self, known=True)

    def strict(self, *_args, **_kwargs):
        raise _Parsed(self, known=False)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", known)
        patch.setattr(argparse.ArgumentParser, "parse_args", strict)
        patch.setattr(sys, "argv", [module_name, "--help"])
        try:
            module.main()
        except _Parsed as parsed:
            return parsed.parser, parsed.known
    raise AssertionError(f"{module_name}.main() returned without parsing its arguments")


@pytest.fixture
def _hydra():
    """vitexp's config folder, initialised once for all the commands a test composes."""
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), **version_base()):
        yield


def test_readme_is_a_front_door_of_at_most_200_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move a topic to docs/"


def test_the_documents_hold_the_commands_a_user_types():
    vitexp = [c for c in COMMANDS if c.module == "vitexp"]
    assert len(vitexp) >= 60 and len(COMMANDS) - len(vitexp) >= 10, "the code blocks were not read"
    for page in PAGES[1:]:
        first = next((line for line in page.read_text().splitlines()[1:] if line.strip()), "")
        assert first.startswith("```"), f"{page.relative_to(REPO)} must start with the commands a user types"


def test_every_vitexp_command_composes(_hydra):
    failed, skipped, outcome = [], [], {}
    for command in (c for c in COMMANDS if c.module == "vitexp"):
        if command.args not in outcome:  # the pages repeat commands: each is composed once
            try:
                overrides, multirun = _hydra_overrides(command.args)
                _compose(overrides, multirun=multirun)
                outcome[command.args] = None
            except Exception as e:  # every failure is reported, with where it is written
                outcome[command.args] = e
        error = outcome[command.args]
        if error is not None and command.placeholders and DEFAULT_STAND_IN in str(error):
            skipped.append(command.where)  # it needs a real file or option where the page has a placeholder
        elif error is not None:
            failed.append(f"{command.where}: python -m vitexp {' '.join(command.args)}\n    {error!r}")
    assert not failed, f"{len(failed)} documented commands do not compose:\n" + "\n".join(failed)
    total = sum(c.module == "vitexp" for c in COMMANDS)
    assert len(skipped) * 2 < total, f"{len(skipped)} of {total} commands skipped: {skipped}"


def test_every_module_command_parses(monkeypatch, _hydra):
    failed = []
    for command in (c for c in COMMANDS if c.module != "vitexp"):
        try:
            found = _parser_of(command.module, monkeypatch)
            if command.inline and not command.args:
                continue  # the module named in a sentence: it imports and has a main()
            if found is None:
                extra = list(command.args)
            elif found[1]:
                extra = found[0].parse_known_args(list(command.args))[1]
            else:
                found[0].parse_args(list(command.args))
                extra = []
            _compose(extra, multirun=False)  # what a bench passes on to the config
        except (Exception, SystemExit) as e:  # argparse exits on an unknown flag
            failed.append(f"{command.where}: python -m {command.module} {' '.join(command.args)}\n    {e!r}")
    assert not failed, f"{len(failed)} documented commands are refused:\n" + "\n".join(failed)


def _anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def _tokens(line: str) -> list[str]:
    """A shell line's words, or none when it is not shell (a file tree, a sentence with one quote)."""
    try:
        return shlex.split(PLACEHOLDER.sub(_stand_in, line), comments=True)
    except ValueError:
        return []


def test_every_script_test_path_and_link_exists():
    missing = []
    for where, line in _all("line"):
        for token in _tokens(line):
            if token.startswith(("vitexp/bench/", "tests/")) and not (REPO / token.split("::")[0]).exists():
                missing.append(f"{where}: {token}")
    for page in PAGES:
        for target, anchor in LINK.findall(page.read_text()):
            linked = page.parent / target if target else page
            if "://" in target:
                continue
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                missing.append(f"{page.relative_to(REPO)}: link to {target}#{anchor}")
    assert not missing, "missing:\n" + "\n".join(missing)


def test_the_readme_names_every_option_of_every_config_group():
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", (REPO / "README.md").read_text(), re.M)
    named = {group: set(re.findall(r"`([\w.]+)`", options)) for group, options in rows}
    conf = Path(config_dir())
    groups = [p.name for p in conf.iterdir() if p.is_dir() and p.name not in ("base", "hydra")]
    missing = [f"{g}={o.stem}" for g in groups for o in (conf / g).glob("*.yaml") if o.stem not in named.get(g, ())]
    assert not missing, f"README.md's config group table does not name {missing}"
