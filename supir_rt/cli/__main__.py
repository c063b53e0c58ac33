"""``python -m supir_rt.cli``: the ``supir-rt`` command."""

import sys

from supir_rt.cli import main

sys.exit(main())
