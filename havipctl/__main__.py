"""`python -m havipctl …`: the same as the installed `havipctl` command."""

import sys

from havipctl.main import main

sys.exit(main())
