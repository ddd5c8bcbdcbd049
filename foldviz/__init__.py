"""foldviz: data-free model folding, explained and explorable."""
__version__ = "0.1.0"
