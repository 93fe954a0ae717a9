"""The ``tta-client`` command line: ``replay`` a dataset through a stream, ``load`` a server.

Both tools live in the client package (no torch) and talk to the server over HTTP only.
They need the ``cli`` extra (numpy, pillow, rich); the replay plot needs ``plot``
(matplotlib). Errors from the server print as one line and exit 1; bad arguments or an
unusable dataset exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from tta_client._version import __version__

CLI_DEPENDENCIES = ("numpy", "PIL", "rich")


def build_parser() -> argparse.ArgumentParser:
    from tta_client.cli import load, replay

    parser = argparse.ArgumentParser(prog="tta-client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"tta-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{replay,load}")
    replay.add_parser(sub)
    load.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tta-client``; returns the exit status."""
    missing = [m for m in CLI_DEPENDENCIES if importlib.util.find_spec(m) is None]
    if missing:
        sys.stderr.write(f"tta-client: missing {', '.join(missing)}; install with: pip install 'tta-client[cli]'\n")
        return 2
    from rich.console import Console

    from tta_client.cli.common import UsageError
    from tta_client.errors import TTAClientError

    args = build_parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    try:
        status: int = args.run(args, console)
    except UsageError as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]tta-client {args.command}:[/red] {exc}")
        return 2
    except TTAClientError as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[red]tta-client {args.command}: server error:[/red] {exc}"
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return status
