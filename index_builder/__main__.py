"""`python -m index_builder` is `index-builder`."""

import sys

from index_builder.cli import main

sys.exit(main())
