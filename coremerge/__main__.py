import sys

from coremerge.cli import main

sys.exit(main())
