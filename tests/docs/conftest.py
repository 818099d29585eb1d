"""The documentation's tests: README.md and docs/*.md, which document the package as a whole,
so they get a folder of their own beside the package's; tests/conftest.py applies here too."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/docs/markdown_pages.py
