"""`ktc` command line: compile, run, inspect, targets, tiny, demo. One module per verb.

main() is the single error boundary: a KtcError becomes `error: <message>` on one line and
exit code 1; Ctrl-C exits 130; anything else is reported as a one-line internal error
(KTC_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys

from ktc.errors import KtcError


def main(argv: list[str] | None = None) -> int:
    from ktc.cli import compile as _compile  # noqa: F401  (registers the verbs)
    from ktc.cli import demo as _demo  # noqa: F401
    from ktc.cli import inspect as _inspect  # noqa: F401
    from ktc.cli import run as _run  # noqa: F401
    from ktc.cli import targets as _targets  # noqa: F401
    from ktc.cli import tiny as _tiny  # noqa: F401
    from ktc.cli.app import app, err

    try:
        # Non-standalone click returns an exit code instead of exiting; typer maps Ctrl-C to 130.
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int):
            return code
    except KtcError as e:
        err.print(f"[bold red]error:[/] {e.message}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: stopped; nothing half-written was left behind")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click's usage errors and real bugs
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            err.print("[bold red]interrupted[/]")
            return 130
        if os.environ.get("KTC_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (a ktc bug: please report it; "
                  "KTC_DEBUG=1 shows the traceback)", soft_wrap=True)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())
