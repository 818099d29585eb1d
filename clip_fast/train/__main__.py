"""``python -m clip_fast.train``: the reference trainer's command line."""
from .loop import main

main()
