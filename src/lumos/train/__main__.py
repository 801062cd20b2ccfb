"""`python -m lumos.train` / `torchrun -m lumos.train`: the `lumos train` command."""

import sys

from lumos.train.cli import main

sys.exit(main())
