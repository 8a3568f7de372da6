"""``python -m fdsupervisor`` as where the C extension was not built: workers start by os.fork().

Tests of what the child does between fork and exec run the supervisor both
ways (tests/conftest.py, ``FORK_SPAWN``). An upgrade re-executes
``python -m fdsupervisor``, which goes back to the native path.
"""

import sys

from fdsupervisor import spawn

spawn._native = None  # what spawn.py sets when the import of fdsupervisor._spawn fails

from fdsupervisor.cli import main  # noqa: E402 - after the switch on purpose

sys.exit(main())
