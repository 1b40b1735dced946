"""The bottom layer: extension loading, the one dispatch rule, argument checks, constants, atomic I/O, seed keying
and build information. It imports nothing else from biasfast."""
