"""megaseek's integration with Megatron: launch path, CPU support, model providers.

Importing this package makes `megatron.training` importable on Python 3.11: it applies
`upstream.compat.TYPING_OVERRIDE` (`typing.override`, new in 3.12), the one upstream fix
applied at import time; nothing else happens at import time.
"""

from upstream.compat import provide_typing_override

provide_typing_override()
