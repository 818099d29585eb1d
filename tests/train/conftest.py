"""The reference trainer's tests (``clip_fast.train``); tests/conftest.py applies here too."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/train/train_helpers.py
