"""``python -m balancemm`` → the ``balancemm`` command."""

import sys

from balancemm.cli import main

sys.exit(main())
