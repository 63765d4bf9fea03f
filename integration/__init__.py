"""megaseek's integration with Megatron: launch path, CPU support, model providers.

Importing this package makes `megatron.training` importable on Python 3.11 (see
`integration.compat.provide_typing_override`); nothing else happens at import time.
"""

from integration.compat import provide_typing_override

provide_typing_override()
