"""`python -m loradock_client ...` is the `loradock` command."""

import sys

from loradock_client.cli import main

sys.exit(main())
