"""FLAN-T5-base (see configs/flan_t5.py)."""

from configs import flan_t5


def get_config():
  return flan_t5.get_config("base")
