"""`python -m tnl.server [flags]`: exactly `tnl serve [flags]` (same flags, errors and exit codes)."""
import sys

from tnl.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
