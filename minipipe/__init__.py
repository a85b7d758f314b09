"""minipipe: a pure-NumPy Llama engine split across processes, with exact pipelined speculation."""

__version__ = "0.1.0"
