import os
import sys

# Tests import their rank functions from this folder (tests/dist.py, helpers) in spawned processes.
sys.path.insert(0, os.path.dirname(__file__))
