import sys

from loadtests.loadgen import main

sys.exit(main())
