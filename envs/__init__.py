"""Gymnasium environments: real dm_control pixel tasks and (later) Struct-VRNN imagination.

Importing this package registers ``StructVRNN-Real-<task>`` for the six tasks.
"""

from envs.registration import register_all

register_all()
