"""`python -m diffprobe ...` (and `torchrun ... -m diffprobe ...`): the same as the `diffprobe` command."""

import sys

from .cli import main

sys.exit(main())
