"""Converters from other checkpoint formats to PaddleNLP checkpoint directories
(``ftlab.convert.llama2c.convert_llama2c``).

The package imports nothing, so that ``python -m ftlab.convert.llama2c`` does not find its
own module already imported by the package (runpy warns about that).
"""
