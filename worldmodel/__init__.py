"""Action-conditional Struct-VRNN world models for the DeepMind Control Suite."""

__version__ = "0.1.0"
