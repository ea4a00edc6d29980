import sys

from services.binding.main import main

sys.exit(main())
