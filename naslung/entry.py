"""The console scripts `naslung`, `naslung-search` and `naslung-export`.

They install the SIGTERM handler and catch Ctrl-C before the command line's modules (torch
among them) are imported, so an interrupt at any moment, import included, ends with one line
and status 130 (143 for SIGTERM), never a traceback.
"""

from __future__ import annotations

from naslung.processes import raise_on_sigterm, report_interrupt


def _launch(name: str) -> int:
    try:
        raise_on_sigterm()
        from naslung import cli

        return getattr(cli, name)()
    except KeyboardInterrupt as err:
        return report_interrupt(err)


def main() -> int:
    return _launch("main")


def search_main() -> int:
    return _launch("search_main")


def export_main() -> int:
    return _launch("export_main")
