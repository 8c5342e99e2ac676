"""The ``snca`` command line: one module per subcommand in this package, discovered at start.

Each module defines ``register(subparsers)`` (adds its subparser, ``set_defaults(func=run)``)
and ``run(args) -> int``: it parses, makes one library call, prints. Adding a command is adding
a module here.

Errors meant for users (:class:`~snca.errors.SncaError`, and missing files) print one line,
``snca: error: <what is wrong and what to do>``, and exit with status 2, without a traceback.
Set ``SNCA_DEBUG=1`` to see the traceback anyway. Warnings print as one ``snca: warning: ...``
line. SIGTERM stops a command as Ctrl-C does (a training run saves its state) and exits with
143; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import SncaError
from ..runtime import Terminated, sigterm_as_interrupt


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per discovered command module."""
    parser = argparse.ArgumentParser(
        prog="snca",
        description="Scalable Neighbourhood Component Analysis: train embeddings for kNN "
        "classification with an augmented memory, evaluate, extract, and use them.",
    )
    parser.add_argument("--version", action="version", version=f"snca {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as err:  # one broken command must not take the others down
            if os.environ.get("SNCA_DEBUG"):
                raise
            print(f"snca: warning: command module {info.name!r} failed to import ({_one_line(err)[:200]})", file=sys.stderr)
            continue
        if callable(getattr(module, "register", None)) and callable(getattr(module, "run", None)):
            module.register(subparsers)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """Warnings as one line, ``snca: warning: ...``, without the source line Python adds."""
    print(f"snca: warning: {_one_line(message)}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``snca`` and ``python -m snca``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    shown = warnings.showwarning
    if not os.environ.get("SNCA_DEBUG"):
        warnings.showwarning = _show_warning
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except Terminated:
        print("snca: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except SncaError as err:
        if os.environ.get("SNCA_DEBUG"):
            raise
        print(f"snca: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if os.environ.get("SNCA_DEBUG"):
            raise
        name = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"snca: error: {err.strerror or _one_line(err)}:{name}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("snca: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
