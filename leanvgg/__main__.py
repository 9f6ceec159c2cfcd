import sys

from leanvgg.cli import main

sys.exit(main())
