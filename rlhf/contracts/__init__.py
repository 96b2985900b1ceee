"""The contracts: what the core and the plugins agree on.

Protocols and batch types (`interfaces`), the plugin registry (`registry`), every typed
config schema and `compose` (`schema`), and the one range-check helper (`checks`). This
layer imports nothing else of `rlhf`; the library (`rlhf.core`, `rlhf.embedded`) builds on
it and the commands (`rlhf.apps`) on both. A plugin imports from here and from the library:

    from rlhf.contracts.registry import register
    from rlhf.contracts.interfaces import Rollout
"""
