"""Hooks that put clip_fast's losses into other projects' trainers (``integrations.open_clip``).

Nothing here is imported by ``clip_fast`` itself: the loss library depends on torch alone.
"""
