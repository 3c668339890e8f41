"""One module per chapter of the book: its settings (`for_profile`), tables and figures.

A study may import the core, the analyses and the mini world; nothing below imports a study.
"""
