"""Translations to and from other tools: PaddleNLP's argument files out
(``paddlenlp_export``: ``run_finetune.json``; ``preference_export``: ``run_dpo.py`` /
``run_kto.py``'s) and in (``paddlenlp_import``)."""
