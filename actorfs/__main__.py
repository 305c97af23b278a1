"""`python3 -m actorfs ...` is the `actorfs` command."""

import sys

from actorfs.runtime.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
