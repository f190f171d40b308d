"""The scripts in scripts/ (files, not a package), loaded as modules for their tests."""

import importlib.util
import os
import types

_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load(name: str) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(name, os.path.join(_SCRIPTS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
