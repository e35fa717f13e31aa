import sys

from dsrouter.cli import main

sys.exit(main())
