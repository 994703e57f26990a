"""``python -m tfseg <command>``: the same as the ``tfseg`` console script."""

import sys

from tfseg.cli import main

sys.exit(main())
