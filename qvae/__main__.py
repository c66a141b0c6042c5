"""`python -m qvae` is the same CLI as `qvae`."""

import sys

from qvae.cli import main

sys.exit(main())
