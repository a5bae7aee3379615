"""The fleet manager of this project root (README, "The fleet").

    python workers/uniphant/manager.py <uuid> start      # or start -f under systemd

It starts, supervises and stops the workers that the `workers` table asks of
this host, and records what happens to them in `worker_states`.
"""

from uniphant import main, manage

if __name__ == "__main__":
    main(manage)
