"""deltamem's entry point (`deltamem`, `python -m deltamem.app`); the commands are in cli/."""

import sys

from deltamem.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
