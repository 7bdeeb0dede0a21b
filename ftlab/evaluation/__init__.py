"""Task metrics computed by generating from the model (the demo task's entity recall)."""

from ftlab.evaluation.entity_recall import (
    EntityRecall,
    RecordRecall,
    count_entity,
    entity_hits,
    entity_pattern,
    entity_recall,
)

__all__ = [
    "EntityRecall",
    "RecordRecall",
    "count_entity",
    "entity_hits",
    "entity_pattern",
    "entity_recall",
]
