"""`python -m mtrain.launch TORCHRUN_ARGS...`: torchrun, in this very process, for the launchers.

scripts/train.sh `exec`s it, so the SIGTERM of Slurm or Kubernetes reaches torchrun, which passes
it on to the workers. The one difference from torchrun: when a worker stopped on a user error
(it wrote its `error: ...` line to MTRAIN_ERROR_FILE, see mtrain/errors.py), the launcher prints
that line once to fd 3 (the launcher's stderr) and exits with code 2, instead of torchrun's
exit 1 and a ChildFailedError report per failing rank. Any other failure keeps torchrun's
report and exit code.
"""

from __future__ import annotations

import os
import sys

from mtrain.errors import EXIT_USER_ERROR


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    sys.argv[0] = "torchrun"
    try:
        torchrun()
    except ChildFailedError:
        path = os.environ.get("MTRAIN_ERROR_FILE")
        if not path or not os.path.isfile(path):
            raise
        with open(path) as error, open(3, "w") as stderr:
            stderr.write(error.read())
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
