"""`python -m jaxmedusa ...` is the `jaxmedusa` command."""

import sys

from .cli import main

sys.exit(main())
