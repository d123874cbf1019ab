"""The console scripts `naslung`, `naslung-search` and `naslung-export`.

They install the interrupt handlers and catch Ctrl-C before the command line's modules (torch
among them) are imported, and ignore interrupts once the command is over, so an interrupt at any
moment, import and shutdown included, ends with one line and status 130 (143 for SIGTERM), or
with the command's own status if it had already finished; never a traceback.
"""

from __future__ import annotations

from naslung.processes import ignore_interrupts, install_interrupt_handlers, report_interrupt


def _launch(name: str) -> int:
    try:
        install_interrupt_handlers()
        from naslung import cli

        status = getattr(cli, name)()
    except KeyboardInterrupt as err:
        return report_interrupt(err)
    ignore_interrupts()
    return status


def main() -> int:
    return _launch("main")


def search_main() -> int:
    return _launch("search_main")


def export_main() -> int:
    return _launch("export_main")
