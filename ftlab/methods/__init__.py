"""Fine-tuning methods: full-parameter SFT and the PEFT zoo, one module and class each.

``registry`` defines the ``Method`` interface (a leaf); ``catalog`` loads the built-in
methods and looks them up by name; ``reopen`` rebuilds a finished run's model.
"""
