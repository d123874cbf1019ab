"""The one rich console naslung prints tables, progress and results to."""

from rich.console import Console

console = Console()
if not console.is_terminal:
    console.width = 120  # logs and pipes: keep table rows and result lines on one line
