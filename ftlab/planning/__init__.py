"""Before a run: the memory plan (``mode=plan``) and the PaddleNLP argument file
(``mode=export``)."""
