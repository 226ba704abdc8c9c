import sys

from stepserve.cli import main

sys.exit(main())
