"""Integrations with optional libraries: ``hf_localist.integrations.trl`` (TRL's ``SFTTrainer``; ``pip install
hf-localist[trl]``). Nothing here is imported by ``import hf_localist``."""
