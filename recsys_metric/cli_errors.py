"""How the ``recsys-metric`` command turns failures into one line and an exit code.

=====  =========================================================================================
code   meaning
=====  =========================================================================================
0      done
1      a bug: the traceback is printed (please report it)
2      a mistake in the input, the config or the command line, or an I/O error (missing file,
       permission, full disk): one line on stderr that names the file, the key or the column and
       says what to do; ``-v`` adds the traceback
3      ``run``/``publish``: the quality gate refused the run; it is complete and kept, ``current``
       did not move (docs/operations.md)
130    interrupted (Ctrl-C)
141    stdout was closed early (``recsys-metric recommend u | head``): nothing more is printed, as
       for a command that SIGPIPE ends
=====  =========================================================================================

``argparse`` mistakes (an unknown option, a missing argument) also exit 2, with its usage line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from recsys_metric.errors import RecsysMetricError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

log = logging.getLogger("recsys_metric.cli")


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces collapsed (a multi-line message stays readable)."""
    return " ".join(str(text).split())


def _os_error_text(err: OSError) -> str:
    """``[Errno 13] Permission denied: 'x'`` -> ``x: permission denied (errno 13)``: the path first."""
    if err.filename is None or err.strerror is None:
        return one_line(err)
    where = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
    return f"{where}: {err.strerror[:1].lower()}{err.strerror[1:]} (errno {err.errno})"


def _prog(args: argparse.Namespace) -> str:
    return getattr(args, "prog", None) or f"recsys-metric {args.command}"


def _fail(args: argparse.Namespace, message: str) -> int:
    if getattr(args, "verbose", False):
        log.info("traceback", exc_info=True)
    print(f"{_prog(args)}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func(args)`` and map what it raises to one line on stderr and an exit code.

    ``args.command`` names the command in messages (``recsys-metric COMMAND: error: ...``), or
    ``args.prog`` the whole program (``python -m flows.nightly_retrain``); ``args.verbose`` adds
    the traceback to a reported error.
    """
    try:
        code = int(args.func(args) or 0)
        # Flushed here, not at exit: a closed pipe must surface inside this try.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RecsysMetricError as err:
        return _fail(args, one_line(err))
    except KeyError as err:
        return _fail(args, f"unknown id {err}")
    except OSError as err:
        return _fail(args, _os_error_text(err))
