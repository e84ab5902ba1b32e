import os
import sys

# Tests import the package from the source tree when it is not installed (CI installs it).
sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
