"""HF <-> Megatron checkpoint converters (`python -m converters.hf2mcore`, `converters.mcore2hf`)."""
