"""Allow ``python -m netblk_certs`` as an alias of the ``netblk-certs`` command."""

import sys

from netblk_certs.cli import main

sys.exit(main())
