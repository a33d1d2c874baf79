"""Every code example in README.md and docs/*.md runs, and the output it shows is the real one.

How each fenced block is treated, by its language tag:

- ``pycon``: a doctest (``>>>`` / ``...`` prompts, the expected output below). Output is compared
  after :func:`normalize` (run ids, times, latencies) with ``NORMALIZE_WHITESPACE``.
- ``python``: executed as it is; it must not raise.
- ``console``: ``$ command`` lines, each followed by the output it shows; the command runs in bash
  and its stdout and stderr together must equal the output shown (after :func:`normalize`; a line
  ``...`` stands for any number of lines). It must exit 0: show a failure as
  ``$ command; echo "exit code $?"``.
- ``bash`` / ``sh`` / ``shell``: every command runs and must exit 0; the output is not compared.
- anything else (``text``, ``yaml``, ``toml``, no tag, ...): shown, not run.

Blocks of one page run in order in one Python namespace and one working directory, a fresh
temporary directory holding ``data/`` (the bundled log), ``.venv`` (this interpreter's prefix, so
``.venv/bin/recsys-metric`` is this checkout's CLI) and ``artifacts/``, a run published from the
bundled data with the default config, as ``make run`` leaves it. A page whose first command is
that very run (``.venv/bin/recsys-metric run``) starts without ``artifacts/`` instead.

To keep a block from running (it starts a Prefect server, needs PostgreSQL or a GPU, installs
packages, or runs for minutes), put this on the line right above its fence, with the reason::

    <!-- docs-test: skip (needs a Prefect server) -->

Use it sparingly: a skipped example can go stale.
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!-- docs-test: skip \((?P<reason>[^)]+)\) -->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<lang>[\w-]*)\s*$")
RUN_COMMAND = ".venv/bin/recsys-metric run"
RUN_LANGS = {"pycon", "python", "console", "bash", "sh", "shell"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the reason, when marked skip

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order, with their skip markers."""
    lines = page.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence, indent = i, m["fence"], len(m["indent"])
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][indent:])
            i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.match(prev)
        blocks.append(
            Block(page, start + 1, m["lang"], "\n".join(body) + "\n", marker["reason"] if marker else None)
        )
        i += 1
    return blocks


_PATTERNS = [
    (re.compile(r"\b\d{8}T\d{6}Z-[0-9a-f]{4}\b"), "<run-id>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}\b(?!\.)"), "<time>"),
    (re.compile(r"\b\d[\d,]*(\.\d+)? (ms|s|users/s)\b"), r"<n> \2"),
]


def normalize(text: str, workdir: Path | None = None) -> str:
    """What may differ between two runs of the same example: run ids, wall-clock times, latencies.

    Also the working directory's absolute path (commands print absolute run paths) and trailing
    whitespace; box-drawing tables keep their shape since only the digits inside change.
    """
    if workdir is not None:
        text = text.replace(f"{workdir.resolve()}/", "").replace(f"{workdir}/", "")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return "\n".join(lines)


def output_matches(expected: str, actual: str) -> bool:
    """Line by line equality, where an expected line ``...`` matches any run of lines."""
    want, got = expected.splitlines(), actual.splitlines()
    pattern = "".join(r"(?:.*\n)*?" if line == "..." else re.escape(line) + r"\n" for line in want)
    return re.fullmatch(pattern, "".join(line + "\n" for line in got)) is not None


def console_commands(text: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` pairs of a console block; ``\\`` continues a command."""
    pairs: list[tuple[str, list[str]]] = []
    continuing = False
    for line in text.splitlines():
        if continuing:
            pairs[-1] = (pairs[-1][0] + "\n" + line, pairs[-1][1])
            continuing = line.endswith("\\")
        elif line.startswith("$ "):
            pairs.append((line[2:], []))
            continuing = line.endswith("\\")
        elif pairs:
            pairs[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"console block output before any '$ ' command: {line!r}")
    return [(command, "\n".join(output)) for command, output in pairs]


def shell_commands(text: str) -> list[str]:
    """The commands of a bash block, comments and blank lines dropped, ``\\`` continuations joined."""
    commands, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += line + "\n"
        if not stripped.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.prefix) / "bin"), env.get("PATH", "")))
    env.update(MPLBACKEND="Agg", COLUMNS="200", NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


COMMAND_TIMEOUT_S = 300


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        # A server or a scheduler never returns: say how to keep such an example out of the run.
        raise AssertionError(
            f"`{command}` ran over {COMMAND_TIMEOUT_S} s; if it cannot finish (a server, a scheduler), "
            "put <!-- docs-test: skip (the reason) --> on the line above its block"
        ) from None


def _make_workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "data").symlink_to(ROOT / "data", target_is_directory=True)
    (path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return path


@pytest.fixture(scope="module")
def published_run(tmp_path_factory) -> tuple[Path, str]:
    """``make run``'s run, made once: (its artifacts directory, its normalized output)."""
    workdir = _make_workdir(tmp_path_factory.mktemp("docs_run"))
    done = _shell(RUN_COMMAND, workdir)
    assert done.returncode == 0, done.stdout
    return workdir / "artifacts", normalize(done.stdout, workdir)


class _Checker(doctest.OutputChecker):
    def __init__(self, workdir: Path):
        self.workdir = workdir

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(normalize(want) + "\n", normalize(got, self.workdir) + "\n", optionflags)


class PageRunner:
    """Runs the blocks of one page, in order, in one namespace and one working directory."""

    def __init__(self, page: Path, workdir: Path, published: tuple[Path, str]):
        self.page, self.workdir, self.published = page, workdir, published
        self.namespace: dict[str, object] = {"__name__": "__docs__"}

    def run(self, block: Block) -> None:
        getattr(self, f"_run_{block.lang if block.lang in ('pycon', 'python', 'console') else 'bash'}")(block)

    def _command(self, command: str) -> tuple[int, str]:
        artifacts, output = self.published
        if command == RUN_COMMAND and not (self.workdir / "artifacts").exists():
            # The same command on the same data and config already ran once in this module: take
            # its run and its output (30 s saved per page) instead of training again.
            shutil.copytree(artifacts, self.workdir / "artifacts", symlinks=True)
            return 0, output
        done = _shell(command, self.workdir)
        return done.returncode, normalize(done.stdout, self.workdir)

    def _run_console(self, block: Block) -> None:
        for command, shown in console_commands(block.text):
            rc, actual = self._command(command)
            assert rc == 0, f"{block.where()}: `{command}` exited {rc}:\n{actual}"
            expected = normalize(shown)
            assert output_matches(expected, actual), (
                f"{block.where()}: `{command}` printed something else than the page shows.\n"
                f"--- shown\n{expected}\n--- printed\n{actual}"
            )

    def _run_bash(self, block: Block) -> None:
        for command in shell_commands(block.text):
            rc, actual = self._command(command)
            assert rc == 0, f"{block.where()}: `{command}` exited {rc}:\n{actual}"

    def _run_python(self, block: Block) -> None:
        code = compile(block.text, block.where(), "exec")
        exec(code, self.namespace)

    def _run_pycon(self, block: Block) -> None:
        parser = doctest.DocTestParser()
        test = parser.get_doctest(block.text, self.namespace, block.where(), str(self.page), block.line)
        flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
        runner = doctest.DocTestRunner(checker=_Checker(self.workdir), optionflags=flags)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        assert runner.failures == 0, "".join(report)


def _runnable(page: Path) -> list[Block]:
    return [b for b in fenced_blocks(page) if b.lang in RUN_LANGS and b.skip is None]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_the_page_run_and_show_their_real_output(page, published_run, tmp_path, monkeypatch):
    blocks = _runnable(page)
    workdir = _make_workdir(tmp_path / "work")
    first_command = next(
        (c for b in blocks if b.lang in ("console", "bash", "sh", "shell") for c in _first_commands(b)),
        None,
    )
    if not (blocks[0].lang in ("console", "bash", "sh", "shell") and first_command == RUN_COMMAND):
        shutil.copytree(published_run[0], workdir / "artifacts", symlinks=True)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    runner = PageRunner(page, workdir, published_run)
    for block in blocks:
        runner.run(block)


def _first_commands(block: Block) -> list[str]:
    if block.lang == "console":
        return [c for c, _ in console_commands(block.text)][:1]
    return shell_commands(block.text)[:1]


def test_every_skip_marker_gives_a_reason_and_sits_on_a_runnable_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        blocks = {b.line: b for b in fenced_blocks(page)}
        for number, line in enumerate(lines, start=1):
            if "docs-test:" not in line:
                continue
            assert SKIP.match(line.strip()), f"{page.name}:{number}: malformed marker {line!r}"
            following = next(
                n for n in range(number + 1, len(lines) + 2) if n > len(lines) or lines[n - 1].strip()
            )
            block = blocks.get(following)
            assert block is not None, f"{page.name}:{number}: a skip marker must sit right above a fence"
            assert block.lang in RUN_LANGS, (
                f"{page.name}:{number}: marks a {block.lang or 'plain'} block, never run"
            )


def test_the_readme_and_the_pages_have_runnable_examples():
    # The parser itself: a page that silently lost its examples (say, a renamed fence tag) fails here.
    readme = _runnable(ROOT / "README.md")
    assert any(b.lang == "console" for b in readme) and any(b.lang == "pycon" for b in readme)
    assert any(b.lang == "pycon" for b in _runnable(ROOT / "docs" / "python.md"))


def test_output_comparison_is_exact_apart_from_what_varies():
    shown = "run 20261124T061259Z-c1e2 -> artifacts/runs/20261124T061259Z-c1e2\np50 0.14 ms, p99 0.20 ms\n"
    printed = "run 20261204T143036Z-6167 -> artifacts/runs/20261204T143036Z-6167\np50 0.23 ms, p99 0.32 ms\n"
    assert normalize(shown) == normalize(printed)
    assert normalize("recall@20 0.4192") != normalize("recall@20 0.4193")
    assert normalize("/tmp/w/artifacts/runs/x", Path("/tmp/w")) == "artifacts/runs/x"
    assert output_matches("a\n...\nd", "a\nb\nc\nd")
    assert output_matches("a\n...\nd", "a\nd")
    assert not output_matches("a\nd", "a\nb\nd")
    assert console_commands("$ echo a \\\n  b\na b\n$ true\n") == [("echo a \\\n  b", "a b"), ("true", "")]
    assert shell_commands("# note\nmake run  # why\n\nfoo \\\n  --bar\n") == [
        "make run  # why",
        "foo \\\n  --bar",
    ]
