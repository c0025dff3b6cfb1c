"""Moved to :mod:`seer_attn.data` (shared by training and evaluation); re-exported here so old imports work."""

from seer_attn.data import *  # noqa: F401,F403
from seer_attn.data import __all__  # noqa: F401
