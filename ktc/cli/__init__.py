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
    from ktc.cli import bench as _bench  # noqa: F401
    from ktc.cli import calibrate as _calibrate  # noqa: F401
    from ktc.cli import compile as _compile  # noqa: F401  (registers the verbs)
    from ktc.cli import demo as _demo  # noqa: F401
    from ktc.cli import inspect as _inspect  # noqa: F401
    from ktc.cli import pack as _pack  # noqa: F401
    from ktc.cli import run as _run  # noqa: F401
    from ktc.cli import targets as _targets  # noqa: F401
    from ktc.cli import tiny as _tiny  # noqa: F401
    from ktc.cli import tune as _tune  # noqa: F401
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
        usage, abort = _click_exceptions()
        if isinstance(e, usage):
            e.show()
            return e.exit_code
        if isinstance(e, abort):
            err.print("[bold red]interrupted[/]")
            return 130
        if os.environ.get("KTC_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (a ktc bug: please report it; "
                  "KTC_DEBUG=1 shows the traceback)", soft_wrap=True)
        return 2
    return 0


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """click's usage-error and abort classes: typer >= 0.29 vendors click as typer._click."""
    usage: list[type] = []
    abort: list[type] = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = __import__(name, fromlist=["ClickException"])
        except ImportError:
            continue
        usage.append(mod.ClickException)
        if hasattr(mod, "Abort"):
            abort.append(mod.Abort)
    return tuple(usage), tuple(abort)


def entry() -> None:
    sys.exit(main())
