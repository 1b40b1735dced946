"""`python -m biasfast <command>`: the command line of biasfast.apps.main."""

import sys

from biasfast.apps.main import main

sys.exit(main())
