import sys

from fedlib_cli.main import main

sys.exit(main())
