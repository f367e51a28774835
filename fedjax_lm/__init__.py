"""fedjax_lm: communication-efficient training of language models with federated methods.

Importing it changes nothing in the process: the CPU runtime defaults (XLA flags, allocator) are
applied by an explicit ``fedjax_lm.cpu.apply_defaults()`` (see ``fedjax_lm/cpu.py``).
"""

__version__ = "0.1.0"
