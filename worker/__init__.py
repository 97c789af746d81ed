"""The child side of FailCore: bootstrap, lock-down, guards, run loop and wire protocol.

Standard library plus cloudpickle only. Never imports ``failcore``.
"""
