import sys

from infemu_operator.main import main

sys.exit(main())
