"""The fleet manager of this project root (docs/fleet.md, "The fleet").

    python workers/uniphant/manager.py start       # also stop, status, restart; start -f under systemd

It starts, supervises and stops the workers that the `workers` table asks of
this host, and records what happens to them in `worker_states`.  It runs once
per project root: its worker id comes from the root's host id (or give one).
"""

import os
import sys

# A vendored uniphant.py lies in the project root, two directories up (docs/install.md, "Install").
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from uniphant import main  # noqa: E402
from uniphant_fleet import manage  # noqa: E402

if __name__ == "__main__":
    main(manage)
