import os
import sys

# Tests import `configs.*` and `pallas_kernels` from the repository root, like main.py does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
