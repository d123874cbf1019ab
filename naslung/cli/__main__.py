"""``python -m naslung.cli ...``: the same as the `naslung` command."""

import sys

from naslung.entry import main

sys.exit(main())
