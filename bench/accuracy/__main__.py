"""``python -m bench.accuracy``: see README.md beside this file."""

import sys

from bench.accuracy.run import main

sys.exit(main())
