import sys

from safemerge_ext.cli import main

sys.exit(main())
