"""Gymnasium environments: real dm_control pixel tasks and Struct-VRNN imagination.

Importing this package registers ``StructVRNN-Real-<task>`` and ``StructVRNN-Imagined-<task>`` (with a
batched ``vector_entry_point`` for ``gym.make_vec``) for the six tasks.
"""

from envs.registration import register_all

register_all()
