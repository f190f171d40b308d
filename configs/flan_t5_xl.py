"""FLAN-T5-xl (see configs/flan_t5.py)."""

from configs import flan_t5


def get_config():
  return flan_t5.get_config("xl")
