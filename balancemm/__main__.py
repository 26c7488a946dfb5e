"""``python -m balancemm`` → the ``balancemm`` command."""

import os
import sys

from balancemm.cli import main

code = main()
if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
    # A data-parallel worker has left its process group and written what it had to: the interpreter's own
    # teardown can abort in torch's communication threads ("terminate called without an active
    # exception") and turn a finished run into a failed one, so the worker ends here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
