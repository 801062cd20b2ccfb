"""``python -m lumos.evaluate``: the ``lumos eval`` command."""

import sys

from lumos.evaluate.cli import main

sys.exit(main())
