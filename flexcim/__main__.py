import sys

from flexcim.cli import main

sys.exit(main())
