"""``python -m nvmpriv.crossbar --preset NAME [--json]``."""

import sys

from nvmpriv.crossbar.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
