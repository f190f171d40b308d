from absl import flags

# Grain's worker processes read absl flags, which only absl.app (main.py) parses.
flags.FLAGS.mark_as_parsed()
