"""The demo task: instructions to write a story about given entities (see ``make_stories``)."""
