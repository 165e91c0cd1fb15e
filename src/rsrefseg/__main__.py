import sys

from rsrefseg.cli import main

sys.exit(main())
