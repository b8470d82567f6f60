"""``python -m bot`` (and ``accelerate launch -m bot train NAME``): the `bot` command line."""

import sys

from bot.cli import main

sys.exit(main())
