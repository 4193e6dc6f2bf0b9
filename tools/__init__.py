"""Tools around bs-unlearn that are neither library nor benchmark: dataset cutters and remote-machine glue.

``tools/README.md`` says what each is and how to run it.
"""
