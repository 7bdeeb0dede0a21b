"""Fine-tuning methods: full-parameter SFT and the PEFT zoo, one registered class each."""

from ftlab.methods.registry import Method, get_method, method_schemas, register_method

__all__ = ["Method", "get_method", "method_schemas", "register_method"]
