import sys

from mxvision.cli import main

sys.exit(main())
