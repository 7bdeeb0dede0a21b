"""Training stages: supervised fine-tuning and preference alignment (DPO and its
variants, KTO), each one registered class (``ftlab.stages.registry``)."""
